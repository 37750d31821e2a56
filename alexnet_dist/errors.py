"""The package's exceptions: one base class, a few specific kinds, each with the CLI's exit code.

Messages put the thing first and say what to do, e.g. ``"s3://b/k.tar: not found; check the URL"``.
Only the CLI turns them into exit codes (``exit_code``), the same for every command:

| code | meaning                                                               | exception             |
| ---- | --------------------------------------------------------------------- | --------------------- |
| 0    | success (``watch``/``wait``/``submit --follow``: the job SUCCEEDED)   |                       |
| 1    | any other error                                                       | AlexNetDistError      |
| 2    | refused input: a bad spec, argument, setting or ambiguous job name    | ConfigError           |
| 3    | the job FAILED or was CANCELLED                                       | JobFailedError        |
| 4    | the job has not finished yet (``result``; ``wait --timeout`` ran out) | JobNotFinishedError   |
| 5    | not found: no such job, file or object                                | JobNotFoundError,     |
|      |                                                                       | NotFoundError         |
| 6    | a service is unreachable: Redis, the API server, the Ray cluster      | UnreachableError,     |
|      |                                                                       | ClusterError          |
| 7    | no valid token, or the token may not do this                          | AuthError             |
| 130  | interrupted (Ctrl-C)                                                  |                       |
"""

from __future__ import annotations


class AlexNetDistError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class ConfigError(AlexNetDistError):
    """A job spec, model config or setting is invalid."""

    exit_code = 2


class StorageError(AlexNetDistError):
    """Object storage (S3 or a local path) could not be read or written."""


class NotFoundError(StorageError):
    """A URL, job or key does not exist."""

    exit_code = 5


class DataError(AlexNetDistError):
    """Shards or samples are corrupt, or too many were bad."""


class CheckpointError(AlexNetDistError):
    """A checkpoint is missing, truncated or does not match the model."""


class QueueError(AlexNetDistError):
    """The Redis job store is unreachable or refused an operation."""


class JobNotFoundError(QueueError):
    """No job with that id."""

    exit_code = 5


class AmbiguousJobError(ConfigError):
    """A job named by a prefix or a name that several jobs have."""


class JobFailedError(QueueError):
    """The job ended FAILED or CANCELLED (what ``watch``, ``wait`` and ``result`` report)."""

    exit_code = 3


class JobNotFinishedError(QueueError):
    """The job has not ended yet: no result to give, or a wait ran out of time."""

    exit_code = 4


class UnreachableError(QueueError):
    """A server the command needs (Redis, the API server) did not answer."""

    exit_code = 6


class AuthError(AlexNetDistError):
    """No credential, a wrong one or a revoked one (HTTP 401)."""

    exit_code = 7


class PermissionDeniedError(AuthError):
    """The credential is good but does not allow this operation (HTTP 403)."""


class ClusterError(AlexNetDistError):
    """The Ray cluster is unreachable or refused a job."""

    exit_code = 6


class NodeLostError(ClusterError):
    """A Ray node that held workers of a run died under it (a spot reclaim, a hardware fault): the
    cluster's fault, not the job's, so the service queues a new attempt without spending a retry; it
    resumes from the newest checkpoint once the cluster has room for its workers again."""


class JobYielded(AlexNetDistError):
    """A run checkpointed and stopped because the service asked it to yield (preemption); not a failure:
    the job goes back in the queue and resumes from that checkpoint."""

    exit_code = 0
