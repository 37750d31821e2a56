"""The job service, one module per part:

- ``connection``: a Redis client from a URL, with one-line errors; ``keys``: every Redis key and channel;
- ``store``: job records, states and the priority queue, every change one atomic script;
- ``events``: reading a job's events and the results channel;
- ``policy``: which queued jobs to launch, a pure function of the cluster and the jobs;
- ``launcher``: the cluster interface and Ray Jobs; ``dispatcher``: carries out the policy's decisions
  and follows the launched jobs;
- ``operations``: what users invoke (submit, list, cancel, resume, result, watch), for the CLI and the
  HTTP API alike.

It launches training by an entrypoint (``alexnet-dist run-job``) and never imports it.
"""
