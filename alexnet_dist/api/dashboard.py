"""The web dashboard (placeholder until its pages land)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter


def dashboard_router(who: Callable, readable: Callable) -> APIRouter:
    return APIRouter()
