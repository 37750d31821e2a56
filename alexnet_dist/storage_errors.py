"""What a failed S3 call means, in one line: botocore's exceptions sorted into not found, denied, timed
out, unreachable and throttled, each with the URL, the endpoint and what to check; which exceptions mean
"the connection broke mid-body" (re-open with a Range); and the hook that records how many tries a
request had. :mod:`alexnet_dist.storage` uses these for every S3 call.
"""

from __future__ import annotations

from alexnet_dist.errors import NotFoundError, StorageError

__all__ = ["count_tries", "endpoint", "s3_error", "stream_errors", "timed_out", "unreachable"]


def count_tries(attempts: int, caught_exception: BaseException | None = None, **_: object) -> None:
    """botocore's hook after each try of a request: the exception a request ends with is the last one
    seen here, so it carries how many tries the request had (fewer than the client's attempts where
    botocore's retry quota, shared by the client's requests, ran out first)."""
    if caught_exception is not None:
        caught_exception.s3_tries = attempts  # type: ignore[attr-defined]


def endpoint(client) -> str:
    return str(getattr(getattr(client, "meta", None), "endpoint_url", None) or "its default endpoint")


def timed_out(err: BaseException) -> bool:
    from botocore import exceptions as bexc

    return isinstance(err, (bexc.ConnectTimeoutError, bexc.ReadTimeoutError))


def unreachable(err: BaseException) -> bool:
    """Whether ``err`` (after botocore's own tries) means S3 could not be reached: refused, reset, closed
    before answering. Timeouts are not included: each try already waited its whole timeout."""
    from botocore import exceptions as bexc

    connection = (bexc.EndpointConnectionError, bexc.ConnectionClosedError, bexc.ProxyConnectionError)
    return isinstance(err, connection) and not timed_out(err)


def _tries(n: int) -> str:
    return f"{n} try" if n == 1 else f"{n} tries"


def s3_error(
    err: Exception, url: str, client=None, *, also: str = "", connect_s: float, read_s: float
) -> StorageError:
    """One line for a failed S3 call on ``url``: the thing, the endpoint where it matters, what to do;
    ``also`` says what was tried beyond botocore's tries, for an unreachable S3; ``connect_s`` and
    ``read_s`` are the client's timeouts, named in the message of a call that timed out."""
    response = getattr(err, "response", {}) or {}
    code = response.get("Error", {}).get("Code", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in ("404", "NoSuchKey", "NotFound"):
        return NotFoundError(f"{url}: not found; check the URL")
    if code == "NoSuchBucket":
        return NotFoundError(f"{url}: bucket does not exist; create it or check the URL")
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StorageError(f"{url}: access denied ({code}); check the AWS credentials")
    at = f"S3 at {endpoint(client)}"
    tries = _tries(getattr(err, "s3_tries", 1))
    if timed_out(err):
        return StorageError(
            f"{url}: {at}: no answer within {connect_s:g} s (connect) / {read_s:g} s (read) "
            f"in {tries} ({type(err).__name__}); check AWS_ENDPOINT_URL and the network to it"
        )
    if unreachable(err):
        return StorageError(
            f"{url}: {at}: unreachable after {tries}{also} ({type(err).__name__}); check AWS_ENDPOINT_URL "
            "and the network to it"
        )
    if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
        tries = _tries(response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1)
        return StorageError(
            f"{url}: {at}: still answering {code or status} (HTTP {status}) after {tries}; S3 is "
            "throttling or failing: retry later"
        )
    return StorageError(f"{url}: {type(err).__name__}: {err}".splitlines()[0])


def stream_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the connection broke mid-body": re-open with a Range."""
    from botocore import exceptions as bexc
    from urllib3 import exceptions as uexc

    errors: list[type[BaseException]] = [
        bexc.IncompleteReadError,
        bexc.ReadTimeoutError,
        bexc.ConnectionError,
        uexc.ProtocolError,
        uexc.ReadTimeoutError,
        ConnectionError,
        TimeoutError,
    ]
    if hasattr(bexc, "ResponseStreamingError"):
        errors.append(bexc.ResponseStreamingError)
    return tuple(errors)
