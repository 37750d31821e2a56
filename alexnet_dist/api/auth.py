"""Who a request comes from, and whether a cookie-borne change is one the user's own page made.

A request proves its user with ``Authorization: Bearer <token>`` (the CLI, scripts) or with the
dashboard's cookie, which holds the same token (HttpOnly, so no page script can read it; SameSite=Strict,
so another site's page cannot send it). A change (POST) authenticated by the cookie must also carry the
CSRF token, a form field or the ``X-CSRF-Token`` header: an HMAC of the user's token, which a page of
another origin cannot compute. It needs no server state, so any server behind a load balancer checks it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from alexnet_dist.errors import AuthError, PermissionDeniedError
from alexnet_dist.service.users import User, UserStore

__all__ = ["COOKIE", "Caller", "caller", "check_csrf", "csrf_token"]

COOKIE = "alexnet_dist_token"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Caller:
    user: User
    token: str
    by_cookie: bool  # authenticated by the dashboard's cookie: changes need the CSRF token

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)


def csrf_token(token: str) -> str:
    return hmac.new(token.encode(), b"alexnet-dist csrf", hashlib.sha256).hexdigest()


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if header and scheme.lower() != "bearer":
        raise AuthError("Authorization: use 'Bearer <token>'")
    return value.strip() or None


def caller(request: Request, users: UserStore) -> Caller:
    """The user a request comes from; :class:`AuthError` (401) without a valid token."""
    token = bearer(request)
    by_cookie = False
    if token is None:
        token = request.cookies.get(COOKIE) or None
        by_cookie = token is not None
    if token is None:
        raise AuthError(
            "no token: send 'Authorization: Bearer <token>' (set ALEXNET_DIST_TOKEN or run "
            "`alexnet-dist login`)"
        )
    return Caller(users.authenticate(token), token, by_cookie)


def check_csrf(who: Caller, given: str | None) -> None:
    """A change made with the cookie must carry the page's CSRF token (403 otherwise)."""
    if who.by_cookie and not (given and hmac.compare_digest(given, who.csrf)):
        raise PermissionDeniedError("CSRF token missing or wrong; reload the page and try again")
