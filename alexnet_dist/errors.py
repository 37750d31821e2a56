"""The package's exceptions: one base class, a few specific kinds.

Messages put the thing first and say what to do, e.g. ``"s3://b/k.tar: not found; check the URL"``.
Only the CLI turns them into exit codes.
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


class DataError(AlexNetDistError):
    """Shards or samples are corrupt, or too many were bad."""


class CheckpointError(AlexNetDistError):
    """A checkpoint is missing, truncated or does not match the model."""


class QueueError(AlexNetDistError):
    """The Redis job store is unreachable or refused an operation."""


class JobNotFoundError(QueueError):
    """No job with that id."""


class UnreachableError(QueueError):
    """A server the command needs (Redis, the API server) did not answer."""


class AuthError(AlexNetDistError):
    """No credential, a wrong one or a revoked one (HTTP 401)."""


class PermissionDeniedError(AuthError):
    """The credential is good but does not allow this operation (HTTP 403)."""


class ClusterError(AlexNetDistError):
    """The Ray cluster is unreachable or refused a job."""


class JobYielded(AlexNetDistError):
    """A run checkpointed and stopped because the service asked it to yield (preemption); not a failure:
    the job goes back in the queue and resumes from that checkpoint."""

    exit_code = 0
