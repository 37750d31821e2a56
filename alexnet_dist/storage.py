"""Object storage by URL: ``s3://bucket/key`` through boto3, ``file:///abs`` and plain local paths.

What holds here that plain ``boto3`` calls do not give by themselves:

- streaming reads survive a broken connection: :class:`S3ReadStream` re-opens the object with an HTTP
  ``Range`` at the byte already delivered (and ``If-Match`` on the ETag, so a replaced object is an error,
  not a silent splice), so no byte is lost or repeated; a ranged read (:func:`read_range`, what the
  loader's read-ahead issues) resumes the same way inside its range, and a range past the object's end
  reads as empty, as a file read past its end does;
- every S3 call is bounded in time and retried: a connection must open within ``CONNECT_TIMEOUT_S`` and
  the server may go silent for at most ``READ_TIMEOUT_S``; botocore's "standard" retry mode tries each
  request up to ``S3_ATTEMPTS`` times, with backoff (1 s-based for throttling such as 503 SlowDown, 50
  ms-based for resets and timeouts). A broken connection (reset, refused) outlives that quick backoff here:
  reads re-open up to ``READ_RETRIES`` times and seekable uploads start again up to ``WRITE_RETRIES`` times,
  with backoff of seconds; a timeout is not retried beyond botocore's tries, each of which already waited it
  out. What still fails is one :class:`StorageError` line naming the URL and the endpoint, saying what to
  check;
- writes are atomic: S3 shows an object only once its PUT (or multipart upload) completes; locally we
  write a temporary file in the same folder and ``os.replace`` it.

Endpoint, credentials and region come from boto3's standard resolution (``AWS_ENDPOINT_URL``, profiles, ...)
unless ``endpoint_url``/``region`` are passed; the caller gets them from :mod:`alexnet_dist.settings`.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse

from alexnet_dist.errors import NotFoundError, StorageError
from alexnet_dist.storage_errors import count_tries, endpoint, s3_error, stream_errors, unreachable

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 64 * 1024 * 1024  # bytes; above this boto3 uploads in parts (still atomic)
# HTTP connections a process's S3 client keeps open; concurrent GETs beyond it wait for one (read-ahead)
MAX_CONNECTIONS = 32
# A TCP handshake to a reachable endpoint takes milliseconds, across regions well under a second; 10 s
# still rides out two lost SYNs (Linux resends them after 1 and 3 s) and fails a black-holed address fast.
CONNECT_TIMEOUT_S = 10.0
# The longest an S3 server is silent on a healthy connection (boto's own default): the first byte of a
# large CompleteMultipartUpload on MinIO or Ceph takes seconds; AWS sends whitespace meanwhile.
READ_TIMEOUT_S = 60.0
# Tries of one request, the first included: 7 retries back off up to 1+2+4+...+20+20 s (71 s) on
# throttling and up to 6.4 s in all on resets. A silent endpoint fails a request after about
# S3_ATTEMPTS x READ_TIMEOUT_S (8 min); one refusing connections, in seconds.
S3_ATTEMPTS = 8
READ_RETRIES = 6  # re-opens of one read (a body broken mid-way, or S3 unreachable) before giving up
_RETRY_BASE_S = 0.2  # backoff of read re-opens: 0.2, 0.4, 0.8, ... seconds (12.6 s over 6)
WRITE_RETRIES = 3  # fresh starts of a seekable upload that S3 could not be reached for
_WRITE_RETRY_BASE_S = 1.0  # backoff of upload restarts: 1, 2, 4 seconds


@dataclass(frozen=True)
class Location:
    """A parsed URL: ``scheme`` is "s3" or "file"; for "file", ``key`` is an absolute path."""

    scheme: str
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else self.key


def parse_url(url: str) -> Location:
    """Split ``url``; plain paths become absolute local paths; an unknown scheme is a StorageError."""
    if "://" not in url:
        return Location("file", "", str(Path(url).expanduser().absolute()))
    parts = urlparse(url)
    if parts.scheme == "s3":
        key = parts.path.lstrip("/")
        if not parts.netloc:
            raise StorageError(f"{url}: no bucket; write s3://bucket/key")
        return Location("s3", parts.netloc, key)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{url}: file URLs name a local absolute path; write file:///abs/path")
        return Location("file", "", str(Path(unquote(parts.path)).absolute()))
    raise StorageError(f"{url}: unknown scheme {parts.scheme!r}; use s3://bucket/key, file:///path or a path")


def join(base: str, name: str) -> str:
    """``base`` (a folder URL or path) joined with a relative ``name``."""
    loc = parse_url(base)
    if loc.scheme == "s3":
        prefix = loc.key.rstrip("/")
        return f"s3://{loc.bucket}/{prefix + '/' if prefix else ''}{name}"
    return str(Path(loc.key) / name)


# --- S3 clients: one per (process, endpoint, region); boto3 clients must not cross a fork. -------------

_clients: dict[tuple[object, ...], object] = {}
_clients_lock = threading.Lock()
# One boto3 session, inherited by forked processes (it holds no connection): a client made from a session
# that has loaded the S3 service model is cheap, from a new session it costs tens of times more, and every
# loader worker makes one per epoch.
_session = None


def _after_fork() -> None:
    global _clients_lock
    _clients_lock = threading.Lock()  # a lock held by another thread at fork time would stay held here


os.register_at_fork(after_in_child=_after_fork)


def s3_client(endpoint_url: str | None = None, region: str | None = None):
    """This process's S3 client of ``endpoint_url`` (None: boto3's resolution) with the module's bounds."""
    import boto3
    from botocore.config import Config

    global _session
    key = (os.getpid(), endpoint_url, region, CONNECT_TIMEOUT_S, READ_TIMEOUT_S, S3_ATTEMPTS)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if _session is None:
                _session = boto3.session.Session()
            config = Config(
                # "standard": throttling (503 SlowDown), 5xx, resets and timeouts, with jittered backoff;
                # "adaptive" would also hold back sending, which read-ahead's concurrent GETs need not
                retries={"total_max_attempts": S3_ATTEMPTS, "mode": "standard"},
                max_pool_connections=MAX_CONNECTIONS,
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
            )
            client = _session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
            client.meta.events.register("needs-retry.s3", count_tries)
            _clients[key] = client
    return client


def _s3_error(err: Exception, url: str, client=None, *, also: str = "") -> StorageError:
    return s3_error(err, url, client, also=also, connect_s=CONNECT_TIMEOUT_S, read_s=READ_TIMEOUT_S)


class S3ReadStream(io.RawIOBase):
    """A raw, forward-only read stream of one S3 object that resumes with ``Range`` after a broken read.

    ``end`` (inclusive) makes it a ranged read of bytes ``start..end``; a range that starts past the
    object's end reads as empty. ``size`` is the whole object's size once known, ``etag`` its ETag.

    A body that breaks mid-way (reset, cut, silent for READ_TIMEOUT_S) and an open that finds S3
    unreachable after botocore's tries are retried together, with backoff, up to ``READ_RETRIES`` times in a
    row without a byte arriving; ``reconnects`` counts every re-open.
    """

    def __init__(self, url: str, loc: Location, client, *, start: int = 0, end: int | None = None) -> None:
        self.url, self._loc, self._client = url, loc, client
        self.pos, self.end = start, end
        self.reconnects = 0
        self._failing = 0  # tries in a row that failed since a byte last arrived
        self._failing_since = 0.0
        self._errors = stream_errors()
        self.etag: str | None = None
        self.size: int | None = None
        self._body = self._open_retrying()

    def _retry(self, err: BaseException, what: str) -> None:
        """Wait before another try after ``err``, or raise once the re-opens are spent."""
        if self._failing == 0:
            self._failing_since = time.monotonic()
        if self._failing == READ_RETRIES:
            if unreachable(err) and isinstance(err, Exception):
                reopens = f"{READ_RETRIES} re-open{'s' * (READ_RETRIES != 1)}"
                also = f" and {reopens} over {time.monotonic() - self._failing_since:.1f} s"
                raise _s3_error(err, self.url, self._client, also=also) from err
            raise StorageError(
                f"{self.url}: S3 at {endpoint(self._client)}: the connection kept breaking at byte "
                f"{self.pos} ({READ_RETRIES} re-opens in a row, {type(err).__name__}); check the network"
            ) from err
        wait = _RETRY_BASE_S * 2**self._failing
        log.warning("%s: %s at byte %d (%s); re-opening there in %.1f s", self.url, what, self.pos, err, wait)
        time.sleep(wait)
        self._failing += 1
        self.reconnects += 1

    def _open_retrying(self):
        while True:
            try:
                return self._open()
            except StorageError as err:
                cause = err.__cause__
                if cause is None or not unreachable(cause):
                    raise
                self._retry(cause, "S3 unreachable")

    def _open(self):
        kwargs = {"Bucket": self._loc.bucket, "Key": self._loc.key}
        if self.end is not None:
            kwargs["Range"] = f"bytes={self.pos}-{self.end}"
        elif self.pos:
            kwargs["Range"] = f"bytes={self.pos}-"
        if self.etag:
            kwargs["IfMatch"] = self.etag  # the object must not change between re-opens
        try:
            resp = self._client.get_object(**kwargs)
        except Exception as err:
            error = (getattr(err, "response", None) or {}).get("Error", {})  # None on timeouts, resets
            if error.get("Code") in ("412", "PreconditionFailed"):
                raise StorageError(f"{self.url}: object changed while being read; retry the read") from err
            if error.get("Code") in ("416", "InvalidRange") and "Range" in kwargs:  # starts past the end
                if error.get("ActualObjectSize", "").isdigit():
                    self.size = int(error["ActualObjectSize"])
                return io.BytesIO(b"")
            raise _s3_error(err, self.url, self._client) from err
        if self.etag is None:
            self.etag = resp.get("ETag")
            total = str(resp.get("ContentRange", "")).rpartition("/")[2]  # "bytes 0-99/1000"
            self.size = int(total) if total.isdigit() else self.pos + int(resp["ContentLength"])
        return resp["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            try:
                data = self._body.read(len(view))
                view[: len(data)] = data
                self.pos += len(data)
                if data:
                    self._failing = 0
                return len(data)
            except self._errors as err:
                self._retry(err, "read broke")
                try:
                    self._body.close()
                except Exception:  # the old connection is already broken; nothing to save
                    pass
                self._body = self._open_retrying()

    def close(self) -> None:
        if not self.closed:
            try:
                self._body.close()
            finally:
                super().close()


# --- the module API ---------------------------------------------------------------------------------


def open_read(
    url: str, *, endpoint_url: str | None = None, region: str | None = None, buffer_size: int = 1 << 20
) -> IO[bytes]:
    """A buffered binary stream of ``url``; S3 reads resume with Range when the connection breaks."""
    loc = parse_url(url)
    if loc.scheme == "file":
        try:
            return open(loc.key, "rb", buffering=buffer_size)
        except FileNotFoundError as err:
            raise NotFoundError(f"{url}: not found; check the path") from err
        except OSError as err:
            raise StorageError(f"{url}: cannot read ({err.strerror})") from err
    raw = S3ReadStream(url, loc, s3_client(endpoint_url, region))
    return io.BufferedReader(raw, buffer_size=buffer_size)


def read_bytes(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> bytes:
    with open_read(url, endpoint_url=endpoint_url, region=region) as f:
        return f.read()


@dataclass(frozen=True)
class Span:
    """Bytes ``start..`` of an object (up to the range's end, fewer where the object ends first)."""

    start: int
    data: bytearray
    size: int | None  # the whole object's size (None: not known, e.g. an empty S3 object)
    etag: str | None  # S3's ETag of the object the bytes came from; None for local files


def read_range(
    url: str, start: int, end: int, *, endpoint_url: str | None = None, region: str | None = None
) -> Span:
    """Bytes ``start..end`` (inclusive) of ``url`` in one ranged GET that resumes after a broken read.

    A range past the object's end reads as empty, as a file does; missing objects and denied reads raise
    StorageError, thing first, as :func:`open_read` does.
    """
    loc = parse_url(url)
    if loc.scheme == "file":
        with open_read(url) as f:
            f.seek(start)
            data = bytearray(f.read(end - start + 1))
            return Span(start, data, os.fstat(f.fileno()).st_size, None)
    raw = S3ReadStream(url, loc, s3_client(endpoint_url, region), start=start, end=end)
    data, got = bytearray(end - start + 1), 0
    try:
        with memoryview(data) as view:
            while got < len(data):
                n = raw.readinto(view[got : got + (1 << 20)])
                if not n:
                    break
                got += n
    finally:
        raw.close()
    del data[got:]
    return Span(start, data, raw.size, raw.etag)


def write_bytes(url: str, data: bytes, *, endpoint_url: str | None = None, region: str | None = None) -> None:
    """Write ``data`` to ``url`` atomically: readers see the old object or the whole new one."""
    loc = parse_url(url)
    if loc.scheme == "file":
        path = Path(loc.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    _upload(lambda: io.BytesIO(data), url, endpoint_url, region)


def upload_fileobj(
    fileobj: IO[bytes], url: str, *, endpoint_url: str | None = None, region: str | None = None
) -> None:
    """Upload a stream to S3 (multipart above MULTIPART_THRESHOLD: the object appears only when complete).

    A stream is uploaded once (botocore retries each request); :func:`write_bytes` and :func:`put_file`
    also start again when S3 could not be reached."""
    _upload(None, url, endpoint_url, region, fileobj=fileobj)


def _upload(
    open_body: Callable[[], IO[bytes]] | None,
    url: str,
    endpoint_url: str | None,
    region: str | None,
    *,
    fileobj: IO[bytes] | None = None,
) -> None:
    """Upload ``fileobj``, or the body ``open_body`` opens, up to WRITE_RETRIES more times (a fresh body
    each time: s3transfer closes the one it sent) while S3 is unreachable."""
    from boto3.s3.transfer import TransferConfig

    loc = parse_url(url)
    if loc.scheme != "s3":
        raise StorageError(f"{url}: upload_fileobj writes s3:// URLs; use write_bytes or put_file")
    config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
    client = s3_client(endpoint_url, region)
    retries = WRITE_RETRIES if open_body is not None else 0
    start = time.monotonic()
    for attempt in range(retries + 1):
        try:
            # a failed multipart upload is aborted by s3transfer: nothing of it becomes visible
            if open_body is None:
                client.upload_fileobj(fileobj, loc.bucket, loc.key, Config=config)
            else:
                with open_body() as body:
                    client.upload_fileobj(body, loc.bucket, loc.key, Config=config)
            return
        except Exception as err:
            if attempt == retries or not unreachable(err):
                restarts = f"{retries} restart{'s' * (retries != 1)}"
                also = f" and {restarts} over {time.monotonic() - start:.1f} s" if attempt else ""
                raise _s3_error(err, url, client, also=also) from err
            log.warning("%s: upload failed (%s); starting it again", url, str(err).splitlines()[0])
            time.sleep(_WRITE_RETRY_BASE_S * 2**attempt)


def put_file(
    local_path: str | Path, url: str, *, endpoint_url: str | None = None, region: str | None = None
) -> None:
    """Move (local) or upload (S3) a finished local file to ``url``, atomically."""
    loc = parse_url(url)
    if loc.scheme == "file":
        Path(loc.key).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_path, loc.key)
        return
    _upload(lambda: open(local_path, "rb"), url, endpoint_url, region)
    Path(local_path).unlink(missing_ok=True)


def exists(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> bool:
    loc = parse_url(url)
    if loc.scheme == "file":
        return Path(loc.key).exists()
    client = s3_client(endpoint_url, region)
    try:
        client.head_object(Bucket=loc.bucket, Key=loc.key)
        return True
    except Exception as err:
        mapped = _s3_error(err, url, client)
        if isinstance(mapped, NotFoundError):
            return False
        raise mapped from err


def size(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> int:
    loc = parse_url(url)
    if loc.scheme == "file":
        try:
            return Path(loc.key).stat().st_size
        except FileNotFoundError as err:
            raise NotFoundError(f"{url}: not found; check the path") from err
    client = s3_client(endpoint_url, region)
    try:
        return int(client.head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"])
    except Exception as err:
        raise _s3_error(err, url, client) from err


def list_prefix(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> list[str]:
    """Every object URL under ``url`` (a folder or key prefix), sorted; local folders are walked."""
    loc = parse_url(url)
    if loc.scheme == "file":
        root = Path(loc.key)
        if root.is_dir():
            return sorted(str(p) for p in root.rglob("*") if p.is_file())
        return sorted(str(p) for p in root.parent.glob(root.name + "*") if p.is_file())
    return sorted(_iter_s3(loc, url, endpoint_url, region))


def _iter_s3(loc: Location, url: str, endpoint_url: str | None, region: str | None) -> Iterator[str]:
    client = s3_client(endpoint_url, region)
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.key):
            for obj in page.get("Contents", []):
                yield f"s3://{loc.bucket}/{obj['Key']}"
    except Exception as err:
        raise _s3_error(err, url, client) from err


def delete(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> None:
    """Delete one object (missing is not an error: deleting is idempotent)."""
    loc = parse_url(url)
    if loc.scheme == "file":
        Path(loc.key).unlink(missing_ok=True)
        return
    client = s3_client(endpoint_url, region)
    try:
        client.delete_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as err:
        raise _s3_error(err, url, client) from err
