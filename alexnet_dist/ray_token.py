"""Ray 2.60's token auth, for the package's Ray clients (the Ray Jobs API client, ``ray.init``)."""

from __future__ import annotations

import logging

__all__ = ["use_cluster_token"]


def use_cluster_token() -> None:
    """Send the local cluster's auth token, as ``ray.init(address="auto")`` and ``ray start`` do.

    Ray 2.60 turns token auth on for clusters started with ``ray start --head``, but its
    ``JobSubmissionClient`` and ``ray.init(address="host:port")`` send the token (``~/.ray/auth_token``,
    ``RAY_AUTH_TOKEN``) only when ``RAY_AUTH_MODE=token``; without it every call is refused as "Missing
    authentication token", and ``ray.init`` retries that for a minute before "Failed to connect".
    An explicit ``RAY_AUTH_MODE`` (e.g. ``disabled``) is respected; Ray does the reading.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token auth
        return
    quiet = logging.getLogger(maybe_enable_token_auth_if_token_available.__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "token authentication is enabled" warning is no news to a client
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)
