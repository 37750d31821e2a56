"""What the dashboard shows, as data and text: the queue's rows (state, position, reason, ETA, progress
from each running job's newest events) and the small formatters the pages share. No HTML here except
escaping; :mod:`alexnet_dist.api.dashboard` renders the pages and serves them.
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

import redis

from alexnet_dist.api.auth import Caller
from alexnet_dist.errors import UnreachableError
from alexnet_dist.service.operations import JobService
from alexnet_dist.service.store import ACTIVE, TERMINAL, JobRecord, JobState
from alexnet_dist.service.users import can_read

MAX_ENDED = 100  # the queue page shows every waiting and running job, and only this many ended ones
PROGRESS_EVENTS = 50  # newest events read per running job to find its latest step or epoch


def esc(value: Any) -> str:
    """``value`` as HTML text or attribute value: every job name and message is user input."""
    return "" if value is None else html.escape(str(value), quote=True)


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def percent(value: Any) -> str:
    return f"{100 * value:.2f} %" if _num(value) else "—"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "—"


def when(t: float) -> str:
    """A ``<time>`` the script shows in the browser's time zone (UTC until it does)."""
    if not t:
        return "—"
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    return f'<time datetime="{iso}" data-local>{esc(_utc(t))}</time>'


def _span(seconds: float) -> str:
    s = int(abs(seconds))
    if s < 60:
        return "<1 min"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def relative(t: float, now: float) -> str:
    """``in 12 min`` or ``3 h 5 min ago``: the same words as the script's ``relative``."""
    return f"in {_span(t - now)}" if t >= now else f"{_span(now - t)} ago"


def eta_text(pending: dict[str, Any] | None, now: float) -> tuple[str, str]:
    """A queued job's estimated start and finish as (shown text, UTC times for the tooltip)."""
    pending = pending or {}
    parts, title = [], []
    for key, word in (("eta_start", "starts"), ("eta_finish", "ends")):
        t = pending.get(key)
        if _num(t):
            parts.append(f"{word} {relative(t, now)}")
            title.append(f"{word} {_utc(t)}")
    return " · ".join(parts), "; ".join(title)


# -- the queue's rows ---------------------------------------------------------------------------------


def _latest_progress(service: JobService, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The newest step, epoch or final event of each job (one pipelined round trip to Redis)."""
    if not job_ids:
        return {}
    store = service.store
    try:
        pipe = store.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.xrevrange(store.keys.events(job_id), count=PROGRESS_EVENTS)
        replies = pipe.execute()
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise UnreachableError(f"Redis unreachable ({err}); check that redis-server is running") from None
    out: dict[str, dict[str, Any]] = {}
    for job_id, entries in zip(job_ids, replies, strict=True):
        for _, fields in entries:
            try:
                event = json.loads(fields.get("data", "{}"))
            except (TypeError, ValueError):
                continue
            if event.get("type") in ("step", "epoch", "final"):
                out[job_id] = event
                break
    return out


def progress_of(rec: JobRecord, event: dict[str, Any] | None) -> tuple[float | None, str]:
    """How far a job got, as a fraction of its epochs (None: unknown) and a few words."""
    if rec.state is JobState.SUCCEEDED:
        top1 = (rec.result or {}).get("top1_error")
        return 1.0, f"done · top-1 error {percent(top1)}" if _num(top1) else "done"
    if not event:
        return None, ""
    epochs, epoch = event.get("epochs"), event.get("epoch")
    if event.get("type") == "final":
        return 1.0, "final evaluation done"
    if not (_num(epochs) and _num(epoch) and epochs > 0):
        return None, ""
    if event.get("type") == "step":
        step, per_epoch = event.get("step"), event.get("steps_per_epoch")
        done = epoch - 1 + (step / per_epoch if _num(step) and _num(per_epoch) and per_epoch else 0.0)
        text = f"epoch {epoch}/{epochs} · step {step}/{per_epoch}"
    else:
        done, text = float(epoch), f"epoch {epoch}/{epochs} done"
    return max(0.0, min(1.0, done / epochs)), text


_ORDER = {
    JobState.LAUNCHING: 0,
    JobState.RUNNING: 0,
    JobState.QUEUED: 1,
    JobState.PREEMPTED: 1,
    JobState.SUCCEEDED: 2,
    JobState.FAILED: 2,
    JobState.CANCELLED: 2,
}


def queue_rows(service: JobService, me: Caller, now: float) -> tuple[list[dict[str, Any]], int]:
    """The rows of the queue page, in its order (running, then waiting by position, then ended, newest
    first), and how many older ended jobs were left out."""
    pending = service.pending()
    records = [r for r in service.list() if can_read(me.user, r.user, r.team)]

    def key(r: JobRecord) -> tuple:
        group = _ORDER[r.state]
        if group == 0:
            return (0, r.started or r.updated, r.seq)
        if group == 1:
            position = (pending.get(r.id) or {}).get("position")
            return (1, position if _num(position) else float("inf"), r.seq)
        return (2, -r.updated, -r.seq)

    records.sort(key=key)
    ended = [r for r in records if r.state in TERMINAL]
    hidden = max(0, len(ended) - MAX_ENDED)
    if hidden:
        dropped = {r.id for r in ended[MAX_ENDED:]}
        records = [r for r in records if r.id not in dropped]
    latest = _latest_progress(service, [r.id for r in records if r.state in ACTIVE])
    rows = []
    for r in records:
        waits = pending.get(r.id) if r.state is JobState.QUEUED else None
        eta, eta_title = eta_text(waits, now)
        fraction, progress = progress_of(r, latest.get(r.id))
        rows.append(
            {
                "id": r.id,
                "name": r.name,
                "state": r.state.value,
                "cancel_requested": r.cancel_requested and r.state not in TERMINAL,
                "user": r.user,
                "team": r.team,
                "priority": r.priority,
                "position": (waits or {}).get("position"),
                "why": (waits or {}).get("reason") or r.message,
                "eta": eta,
                "eta_title": eta_title,
                "progress": fraction,
                "progress_text": progress,
            }
        )
    return rows, hidden
