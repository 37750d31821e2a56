"""Object storage by URL: ``s3://bucket/key`` through boto3, ``file:///abs`` and plain local paths.

What holds here that plain ``boto3`` calls do not give by themselves:

- streaming reads survive a broken connection: :class:`S3ReadStream` re-opens the object with an HTTP
  ``Range`` at the byte already delivered (and ``If-Match`` on the ETag, so a replaced object is an error,
  not a silent splice), so no byte is lost or repeated; a ranged read (:func:`read_range`, what the
  loader's read-ahead issues) resumes the same way inside its range, and a range past the object's end
  reads as empty, as a file read past its end does;
- throttling and 5xx answers are retried with backoff (botocore's "standard" retry mode);
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse

from alexnet_dist.errors import NotFoundError, StorageError

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 64 * 1024 * 1024  # bytes; above this boto3 uploads in parts (still atomic)
# HTTP connections a process's S3 client keeps open; concurrent GETs beyond it wait for one (read-ahead)
MAX_CONNECTIONS = 32
READ_RETRIES = 6  # re-opens of one streaming read before giving up
_RETRY_BASE_S = 0.2  # backoff of stream re-opens: 0.2, 0.4, 0.8, ... seconds


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

_clients: dict[tuple[int, str | None, str | None], object] = {}
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
    import boto3
    from botocore.config import Config

    global _session
    key = (os.getpid(), endpoint_url, region)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if _session is None:
                _session = boto3.session.Session()
            config = Config(
                retries={"max_attempts": 8, "mode": "standard"},  # throttling + 5xx, with backoff
                max_pool_connections=MAX_CONNECTIONS,
                connect_timeout=10,
                read_timeout=60,
            )
            client = _session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
            _clients[key] = client
    return client


def _s3_error(err: Exception, url: str) -> StorageError:
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
    if code in ("404", "NoSuchKey", "NotFound"):
        return NotFoundError(f"{url}: not found; check the URL")
    if code == "NoSuchBucket":
        return NotFoundError(f"{url}: bucket does not exist; create it or check the URL")
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StorageError(f"{url}: access denied ({code}); check the AWS credentials")
    return StorageError(f"{url}: {type(err).__name__}: {err}".splitlines()[0])


def _stream_errors() -> tuple[type[BaseException], ...]:
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


class S3ReadStream(io.RawIOBase):
    """A raw, forward-only read stream of one S3 object that resumes with ``Range`` after a broken read.

    ``end`` (inclusive) makes it a ranged read of bytes ``start..end``; a range that starts past the
    object's end reads as empty. ``size`` is the whole object's size once known, ``etag`` its ETag.
    """

    def __init__(self, url: str, loc: Location, client, *, start: int = 0, end: int | None = None) -> None:
        self.url, self._loc, self._client = url, loc, client
        self.pos, self.end = start, end
        self.reconnects = 0
        self._errors = _stream_errors()
        self.etag: str | None = None
        self.size: int | None = None
        self._body = self._open()

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
            error = getattr(err, "response", {}).get("Error", {})
            if error.get("Code") in ("412", "PreconditionFailed"):
                raise StorageError(f"{self.url}: object changed while being read; retry the read") from err
            if error.get("Code") in ("416", "InvalidRange") and "Range" in kwargs:  # starts past the end
                if error.get("ActualObjectSize", "").isdigit():
                    self.size = int(error["ActualObjectSize"])
                return io.BytesIO(b"")
            raise _s3_error(err, self.url) from err
        if self.etag is None:
            self.etag = resp.get("ETag")
            total = str(resp.get("ContentRange", "")).rpartition("/")[2]  # "bytes 0-99/1000"
            self.size = int(total) if total.isdigit() else self.pos + int(resp["ContentLength"])
        return resp["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        for attempt in range(READ_RETRIES + 1):
            try:
                data = self._body.read(len(view))
                view[: len(data)] = data
                self.pos += len(data)
                return len(data)
            except self._errors as err:
                if attempt == READ_RETRIES:
                    raise StorageError(
                        f"{self.url}: connection kept breaking at byte {self.pos}; check the network"
                    ) from err
                log.warning("%s: read broke at byte %d (%s); resuming with Range", self.url, self.pos, err)
                self.reconnects += 1
                time.sleep(_RETRY_BASE_S * 2**attempt)
                try:
                    self._body.close()
                except Exception:  # the old connection is already broken; nothing to save
                    pass
                self._body = self._open()
        return 0  # unreachable: the loop returns or raises

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
    upload_fileobj(io.BytesIO(data), url, endpoint_url=endpoint_url, region=region)


def upload_fileobj(
    fileobj: IO[bytes], url: str, *, endpoint_url: str | None = None, region: str | None = None
) -> None:
    """Upload a stream to S3 (multipart above MULTIPART_THRESHOLD: the object appears only when complete)."""
    from boto3.s3.transfer import TransferConfig

    loc = parse_url(url)
    if loc.scheme != "s3":
        raise StorageError(f"{url}: upload_fileobj writes s3:// URLs; use write_bytes or put_file")
    config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
    try:
        s3_client(endpoint_url, region).upload_fileobj(fileobj, loc.bucket, loc.key, Config=config)
    except Exception as err:
        raise _s3_error(err, url) from err


def put_file(
    local_path: str | Path, url: str, *, endpoint_url: str | None = None, region: str | None = None
) -> None:
    """Move (local) or upload (S3) a finished local file to ``url``, atomically."""
    loc = parse_url(url)
    if loc.scheme == "file":
        Path(loc.key).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_path, loc.key)
        return
    with open(local_path, "rb") as f:
        upload_fileobj(f, url, endpoint_url=endpoint_url, region=region)
    Path(local_path).unlink(missing_ok=True)


def exists(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> bool:
    loc = parse_url(url)
    if loc.scheme == "file":
        return Path(loc.key).exists()
    try:
        s3_client(endpoint_url, region).head_object(Bucket=loc.bucket, Key=loc.key)
        return True
    except Exception as err:
        mapped = _s3_error(err, url)
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
    try:
        return int(
            s3_client(endpoint_url, region).head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"]
        )
    except Exception as err:
        raise _s3_error(err, url) from err


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
    paginator = s3_client(endpoint_url, region).get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key):
            for obj in page.get("Contents", []):
                yield f"s3://{loc.bucket}/{obj['Key']}"
    except Exception as err:
        raise _s3_error(err, url) from err


def delete(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> None:
    """Delete one object (missing is not an error: deleting is idempotent)."""
    loc = parse_url(url)
    if loc.scheme == "file":
        Path(loc.key).unlink(missing_ok=True)
        return
    try:
        s3_client(endpoint_url, region).delete_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as err:
        raise _s3_error(err, url) from err
