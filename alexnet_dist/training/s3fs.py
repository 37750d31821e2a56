"""pyarrow's S3 filesystem for Ray Train's checkpoint persistence, with the package's S3 bounds.

Ray sends the run's filesystem to its controller and workers by pickling it, and pyarrow's own
pickling of ``S3FileSystem`` drops ``retry_strategy``: there, a 2 s burst of 503 SlowDown answers
failed the run after pyarrow's default 3 tries. :class:`BoundedS3FileSystem` pickles as its arguments,
so every process that gets it retries as the package's own S3 client does.
"""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs

__all__ = ["BoundedS3FileSystem"]


def _rebuild(attempts: int, kwargs: dict[str, Any]) -> BoundedS3FileSystem:
    return BoundedS3FileSystem(attempts=attempts, **kwargs)


class BoundedS3FileSystem(pafs.S3FileSystem):
    """``S3FileSystem(**kwargs)`` retrying each request up to ``attempts`` times (AWS "standard" mode)."""

    def __init__(self, *, attempts: int, **kwargs: Any) -> None:
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)
        self.attempts, self.kwargs = attempts, dict(kwargs)

    def __reduce__(self) -> tuple[Any, tuple[int, dict[str, Any]]]:
        return _rebuild, (self.attempts, self.kwargs)
