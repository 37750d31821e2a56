"""The job service: Redis keys, the job store, events, the scheduling policy, the dispatcher, the launcher,
and the operations users invoke (submit, cancel, resume, watch). It launches training by an entrypoint
and never imports it."""
