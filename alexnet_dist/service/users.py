"""Users of the HTTP API and their tokens: who may read and change which jobs.

A token is shown once, when the user is added, and never stored: Redis keeps its SHA-256 (a token is 256
random bits, so a fast hash is enough; there is nothing to brute-force as there is with passwords). A
request's token is hashed and looked up, and the stored hash compared in constant time. Revoking drops
the hash, so the token stops working on every server at once (the servers keep no state of their own).

Who may do what (the server enforces it, :func:`can_read` and :func:`can_change`): a user reads the
jobs of their team and cancels or resumes only their own; an admin reads and changes every job.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from alexnet_dist.errors import AuthError, ConfigError, QueueError, UnreachableError
from alexnet_dist.service.keys import Keys

__all__ = ["TOKEN_PREFIX", "User", "UserStore", "can_change", "can_read", "token_hash"]

TOKEN_PREFIX = "adt_"  # marks a string as an alexnet-dist token (secret scanners can find leaked ones)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class User:
    name: str
    team: str
    admin: bool = False
    created: float = 0.0
    revoked: float = 0.0  # when its token was revoked (0: live)
    token_sha256: str = ""  # of its live token ("" once revoked)

    @property
    def live(self) -> bool:
        return not self.revoked and bool(self.token_sha256)

    def public(self) -> dict:
        """What may be shown: everything but the token's hash."""
        out = asdict(self)
        out.pop("token_sha256")
        return out


def can_read(user: User, owner: str, team: str) -> bool:
    return user.admin or team == user.team or owner == user.name


def can_change(user: User, owner: str) -> bool:
    return user.admin or owner == user.name


class UserStore:
    """Users under one key prefix of the job store's Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def add(self, name: str, *, team: str, admin: bool = False, replace: bool = False) -> tuple[User, str]:
        """A new user and their token (returned once, never stored). ``replace`` gives an existing user a
        new token (the old one stops working) and the given team and role."""
        for what, value in (("user name", name), ("team", team)):
            if not _NAME.match(value):
                raise ConfigError(
                    f"{what} {value!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                    "or digit"
                )
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        user = User(name=name, team=team, admin=admin, created=time.time(), token_sha256=token_hash(token))
        old = self.get(name)
        if old is not None and old.live and not replace:
            raise ConfigError(f"user {name}: exists; pass --replace to give them a new token")
        pipe = self.client.pipeline(transaction=True)
        if old is not None and old.token_sha256:
            pipe.hdel(self.keys.tokens, old.token_sha256)
        pipe.hset(self.keys.users, name, json.dumps(asdict(user)))
        pipe.hset(self.keys.tokens, user.token_sha256, name)
        self._call(pipe.execute)
        return user, token

    def get(self, name: str) -> User | None:
        raw = self._call(self.client.hget, self.keys.users, name)
        return User(**json.loads(raw)) if raw else None

    def list(self) -> list[User]:
        raw = self._call(self.client.hgetall, self.keys.users)
        return sorted((User(**json.loads(v)) for v in raw.values()), key=lambda u: u.name)

    def revoke(self, name: str) -> User:
        user = self.get(name)
        if user is None:
            raise QueueError(f"user {name}: not found; see `alexnet-dist admin user list`")
        revoked = User(name=user.name, team=user.team, admin=user.admin, created=user.created,
                       revoked=time.time())  # fmt: skip
        pipe = self.client.pipeline(transaction=True)
        if user.token_sha256:
            pipe.hdel(self.keys.tokens, user.token_sha256)
        pipe.hset(self.keys.users, name, json.dumps(asdict(revoked)))
        self._call(pipe.execute)
        return revoked

    def authenticate(self, token: str) -> User:
        """The live user holding ``token``; :class:`AuthError` for a wrong or revoked one."""
        digest = token_hash(token)
        name = self._call(self.client.hget, self.keys.tokens, digest)
        user = self.get(name) if name else None
        # The lookup is by hash, so its timing tells nothing of the token; the stored hash is compared in
        # constant time all the same, and a revoked user fails here even if a stale index entry remained.
        if user is None or not user.live or not hmac.compare_digest(user.token_sha256, digest):
            raise AuthError("token: not valid (wrong or revoked); ask an admin for a new one")
        return user

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise UnreachableError(
                f"Redis unreachable ({err}); check ALEXNET_DIST_REDIS_URL and that redis-server is running"
            ) from None
