"""Redis connections from a URL (``redis://``, ``rediss://`` for TLS, ``user:password@`` for auth).

Every failure to reach Redis becomes one :class:`QueueError` line that names the server and says what to
check, instead of a redis-py traceback.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

import redis

from alexnet_dist.errors import QueueError, UnreachableError

__all__ = ["connect", "redact", "unreachable"]

log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def unreachable(url: str, err: Exception) -> UnreachableError:
    return UnreachableError(
        f"{redact(url)}: Redis unreachable ({type(err).__name__}: {err}); "
        "check ALEXNET_DIST_REDIS_URL and that redis-server is running"
    )


def connect(url: str, *, timeout: float = 5.0, check: bool = True) -> redis.Redis:
    """A client on ``url`` returning ``str`` values; ``check`` pings once so a bad URL fails here, clearly."""
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise QueueError(f"{redact(url)}: not a Redis URL; use redis://host:port/db or rediss:// for TLS")
    client = redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=timeout,
        socket_timeout=None,  # blocking reads (XREAD BLOCK) set their own limits
        health_check_interval=30,
    )
    if check:
        try:
            client.ping()
        except redis.AuthenticationError as err:
            raise QueueError(f"{redact(url)}: Redis refused the password ({err}); check the URL") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
            raise unreachable(url, err) from None
        log.debug("%s: connected", redact(url))
    return client
