"""The web dashboard: a log-in form, the queue, and one page per job with live learning curves.

Pages are HTML rendered here, every value escaped; the behaviour is ``static/dashboard.js`` and the look
``static/dashboard.css``, both served from this package (no third-party files, nothing from a CDN). The
pages send ``Content-Security-Policy: default-src 'self'``, so no inline script or style runs: what the
script needs (the job id, the CSRF token) travels in ``data-`` attributes and ``<meta>`` tags.

| path               | what                                                                              |
| ------------------ | --------------------------------------------------------------------------------- |
| ``GET /login``     | the token form; ``POST /login`` checks the token and sets the cookie               |
| ``POST /logout``   | clears the cookie (with the CSRF token)                                           |
| ``GET /``          | the queue: every job the user may read; the script refreshes it from /queue.json   |
| ``GET /queue.json``| the queue's rows, formatted as the page shows them                                 |
| ``GET /jobs/{id}`` | a job: state, progress, curves (from its Server-Sent Events), result, log, actions |
| ``GET /static/*``  | the CSS, the script and the icon                                                  |

The cookie holds the user's token, HttpOnly (no script reads it), SameSite=Strict (another site's page
cannot send it) and Secure over HTTPS. Changes made with it carry the CSRF token (see ``auth``); the log-in
form refuses a POST whose ``Origin`` is another site's, so no page can log a browser in as someone else.
The Cancel and Resume buttons appear only for the job's owner or an admin; the API refuses anyone else
all the same.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from alexnet_dist.api.auth import COOKIE, CSRF_HEADER, Caller, check_csrf
from alexnet_dist.api.views import esc, eta_text, percent, queue_rows, when
from alexnet_dist.errors import AlexNetDistError, AuthError, JobNotFoundError, UnreachableError
from alexnet_dist.service.operations import JobService
from alexnet_dist.service.store import TERMINAL, JobRecord, JobState
from alexnet_dist.service.users import UserStore, can_change

__all__ = ["SECURITY_HEADERS", "dashboard_router"]

STATIC = Path(__file__).with_name("static")
ASSETS = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
MAX_FORM_BYTES = 8192  # the forms hold a token and a CSRF token, a few hundred bytes


COLUMNS = ("Job", "State", "User", "Team", "Priority", "Position", "Reason / message", "ETA", "Progress")


def _row_html(row: dict[str, Any]) -> str:
    """One ``<tr>`` of the queue; ``dashboard.js`` builds the same from ``/queue.json``."""
    jid = urllib.parse.quote(row["id"], safe="")
    state = row["state"].lower()
    note = '<div class="sub note">cancel requested</div>' if row["cancel_requested"] else ""
    position = f"#{row['position']}" if row["position"] is not None else "—"
    bar = ""
    if row["progress"] is not None:
        bar = f'<progress max="1" value="{row["progress"]:.4f}"></progress>'
    return (
        f'<tr data-job-id="{esc(row["id"])}">'
        f'<td><a href="/jobs/{jid}">{esc(row["id"])}</a><div class="sub">{esc(row["name"])}</div></td>'
        f'<td><span class="badge state-{esc(state)}">{esc(row["state"])}</span>{note}</td>'
        f"<td>{esc(row['user'])}</td><td>{esc(row['team'])}</td>"
        f'<td class="num">{esc(row["priority"])}</td><td class="num">{esc(position)}</td>'
        f'<td class="why">{esc(row["why"])}</td>'
        f'<td class="eta" title="{esc(row["eta_title"])}">{esc(row["eta"])}</td>'
        f'<td class="progress">{bar}<div class="sub">{esc(row["progress_text"])}</div></td>'
        "</tr>"
    )


# -- pages --------------------------------------------------------------------------------------------


class Assets:
    """The CSS, the script and the icon, read once; their URLs carry a hash of them, so a browser never
    keeps an old copy across an upgrade."""

    def __init__(self) -> None:
        self.files = {name: (STATIC / name).read_bytes() for name in ASSETS}
        self.version = hashlib.sha256(b"".join(self.files.values())).hexdigest()[:12]

    def url(self, name: str) -> str:
        return f"/static/{name}?v={self.version}"


def _layout(
    assets: Assets, title: str, body: str, *, me: Caller | None, page: str, data: dict[str, str] | None = None
) -> str:
    attrs = "".join(f' data-{k}="{esc(v)}"' for k, v in (data or {}).items())
    head_meta = f'<meta name="csrf-token" content="{esc(me.csrf)}">' if me else ""
    nav = ""
    if me:
        role = ' <span class="badge role">admin</span>' if me.user.admin else ""
        nav = (
            '<nav class="who">'
            f'<span class="user"><strong>{esc(me.user.name)}</strong> · team {esc(me.user.team)}{role}</span>'
            '<form method="post" action="/logout" class="logout">'
            f'<input type="hidden" name="csrf" value="{esc(me.csrf)}">'
            '<button type="submit" class="secondary">Log out</button></form></nav>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · alexnet-dist</title>{head_meta}"
        f'<link rel="icon" href="{assets.url("favicon.svg")}" type="image/svg+xml">'
        f'<link rel="stylesheet" href="{assets.url("dashboard.css")}">'
        f'<script src="{assets.url("dashboard.js")}" defer></script>'
        f'</head><body data-page="{esc(page)}"{attrs}>'
        f'<header class="top"><a class="brand" href="/">alexnet-dist</a>{nav}</header>'
        f"<main>{body}</main></body></html>"
    )


def _page(content: str, status: int = 200) -> HTMLResponse:
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-store"}  # pages hold the CSRF token
    return HTMLResponse(content, status_code=status, headers=headers)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


def _local_path(value: str | None) -> str:
    """``value`` if it is a path of this site (where to go after logging in), else ``/``."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return "/"
    parts = urllib.parse.urlsplit(value)
    if parts.scheme or parts.netloc or any(ord(c) < 32 for c in value):
        return "/"
    return value


def _to_login(request: Request) -> RedirectResponse:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    out = _redirect("/login" if here == "/" else "/login?" + urllib.parse.urlencode({"next": here}))
    if request.cookies.get(COOKIE):  # a wrong or revoked token: forget it
        out.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return out


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if len(body) > MAX_FORM_BYTES or kind != "application/x-www-form-urlencoded":
        return {}
    return dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _same_origin(request: Request) -> bool:
    """A form POST from this site's own page (browsers send ``Origin`` with every POST)."""
    origin = request.headers.get("origin")
    if origin is None:  # not a browser (curl, a script): no other site's page is involved
        return True
    return urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")


def _login_page(assets: Assets, *, error: str = "", next_path: str = "/") -> str:
    alert = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    body = (
        '<section class="login card"><h1>Log in</h1>'
        "<p>Paste the token an admin gave you (<code>alexnet-dist admin user add</code> printed it).</p>"
        f'{alert}<form method="post" action="/login">'
        f'<input type="hidden" name="next" value="{esc(next_path)}">'
        '<label for="token">Token</label>'
        '<input id="token" name="token" type="password" autocomplete="current-password" required '
        'spellcheck="false" placeholder="adt_…">'
        '<button type="submit">Log in</button></form></section>'
    )
    return _layout(assets, "Log in", body, me=None, page="login")


def _error_page(assets: Assets, me: Caller | None, status: int, message: str) -> HTMLResponse:
    body = (
        f'<section class="card"><h1>{status}</h1><p class="error">{esc(message)}</p>'
        '<p><a href="/">Back to the queue</a></p></section>'
    )
    return _page(_layout(assets, str(status), body, me=me, page="error"), status)


def _queue_page(assets: Assets, me: Caller, rows: list[dict[str, Any]], hidden: int) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    body_rows = "".join(_row_html(r) for r in rows)
    empty = "" if rows else "No jobs yet: submit one with <code>alexnet-dist submit SPEC</code>."
    more = f"{hidden} older ended jobs not shown; see <code>alexnet-dist list</code>." if hidden else ""
    scope = "every team" if me.user.admin else f"team {esc(me.user.team)}"
    body = (
        f'<section><div class="title-row"><h1>Queue</h1><span class="scope">jobs of {scope}</span>'
        '<span id="refreshed" class="live" role="status"></span></div>'
        '<div class="table-scroll"><table class="queue">'
        f'<thead><tr>{head}</tr></thead><tbody id="jobs">{body_rows}</tbody></table></div>'
        f'<p id="empty" class="muted"{"" if empty else " hidden"}>{empty}</p>'
        f'<p id="hidden-jobs" class="muted">{more}</p></section>'
    )
    return _layout(assets, "Queue", body, me=me, page="queue")


def _facts(items: list[tuple[str, str]]) -> str:
    return "".join(f"<div><dt>{esc(k)}</dt><dd>{v}</dd></div>" for k, v in items)


def _job_page(assets: Assets, me: Caller, rec: JobRecord, pending: dict[str, Any] | None) -> str:
    changes = can_change(me.user, rec.user)
    state = rec.state.value
    cancel_requested = rec.cancel_requested and rec.state not in TERMINAL
    actions = ""
    if changes:  # the server decides who sees the buttons; the API refuses others anyway
        cancel_hidden = " hidden" if rec.state in TERMINAL else ""
        resume_hidden = "" if rec.state in (JobState.FAILED, JobState.CANCELLED) else " hidden"
        disabled = " disabled" if cancel_requested else ""
        actions = (
            '<div class="actions">'
            f'<button type="button" class="danger" data-action="cancel"{cancel_hidden}{disabled}>'
            "Cancel</button>"
            f'<button type="button" data-action="resume"{resume_hidden}>Resume</button>'
            '<span id="action-msg" class="muted" role="status"></span></div>'
        )
    try:
        spec = rec.spec
        epochs = str(spec.train.epochs)
        shape = f"{spec.train.epochs} epochs · batch {spec.train.batch_size} · {spec.scaling.workers} × "
        shape += spec.scaling.devices
    except (AlexNetDistError, ValueError, TypeError):  # a record written by another version
        epochs, shape = "", "—"
    try:
        spec_text = json.dumps(json.loads(rec.spec_json), indent=2)
    except ValueError:
        spec_text = rec.spec_json
    facts = _facts(
        [
            ("User", esc(rec.user or "—")),
            ("Team", esc(rec.team or "—")),
            ("Priority", esc(rec.priority)),
            ("Attempt", esc(rec.attempt)),
            ("Preemptions", esc(rec.preemptions)),
            ("Submitted", when(rec.created)),
            ("Started", when(rec.started)),
            ("Run", esc(shape)),
        ]
    )
    waits = ""
    if pending:
        position = pending.get("position")
        eta, eta_title = eta_text(pending, time.time())
        parts = [f"#{position} in line" if position is not None else "", pending.get("reason") or "", eta]
        waits = " · ".join(p for p in parts if p)
    result = rec.result or {}
    top1, top5, model = result.get("top1_error"), result.get("top5_error"), result.get("model_url")
    crops = ""
    if result:
        how = "ten-crop" if result.get("ten_crop") else "center crop"
        crops = f"{how}, {result.get('val_samples')} images"
    note_hidden = "" if cancel_requested else " hidden"
    body = (
        '<p class="crumbs"><a href="/">← Queue</a></p>'
        f'<section class="job-head"><h1>{esc(rec.name)} <code class="jobid">{esc(rec.id)}</code></h1>'
        f'<p class="status-line"><span id="state" class="badge state-{esc(state.lower())}">'
        f"{esc(state)}</span>"
        f'<span id="cancel-note" class="note"{note_hidden}>cancel requested</span>'
        f'<span id="message">{esc(rec.message)}</span></p>'
        f'<p id="pending" class="pending"{"" if waits else " hidden"}>{esc(waits)}</p>'
        f'{actions}<dl class="facts">{facts}</dl></section>'
        '<section><h2>Progress</h2><div class="bars">'
        '<div class="bar"><span class="bar-label">Epoch <span id="epoch-text">—</span></span>'
        '<progress id="epoch-bar" max="1" value="0"></progress></div>'
        '<div class="bar"><span class="bar-label">Step <span id="step-text">—</span></span>'
        '<progress id="step-bar" max="1" value="0"></progress></div></div>'
        '<dl class="stats">'
        + _facts(
            [
                ("Loss", '<span id="stat-loss">—</span>'),
                ("Learning rate", '<span id="stat-lr">—</span>'),
                ("Images/s", '<span id="stat-ips">—</span>'),
                ("Val top-1 error", '<span id="stat-top1">—</span>'),
                ("Val top-5 error", '<span id="stat-top5">—</span>'),
            ]
        )
        + '</dl><p id="live" class="live" role="status">connecting to the job’s events…</p></section>'
        '<section><h2>Learning curves</h2><div class="charts">'
        '<figure><figcaption>Training loss <span class="key k-train_loss">per epoch</span>'
        '<span class="key k-step_loss">logged steps</span></figcaption>'
        '<svg class="chart" data-chart="loss" role="img" aria-label="training loss"></svg></figure>'
        '<figure><figcaption>Validation error <span class="key k-val_top1_error">top-1</span>'
        '<span class="key k-val_top5_error">top-5</span></figcaption>'
        '<svg class="chart" data-chart="error" role="img" aria-label="validation error"></svg></figure>'
        '<figure><figcaption>Learning rate <span class="key k-lr">per epoch</span></figcaption>'
        '<svg class="chart" data-chart="lr" role="img" aria-label="learning rate"></svg></figure>'
        "</div></section>"
        '<section><h2>Result</h2><dl class="facts" id="result">'
        + _facts(
            [
                ("Top-1 error", f'<span id="res-top1">{esc(percent(top1))}</span>'),
                ("Top-5 error", f'<span id="res-top5">{esc(percent(top5))}</span>'),
                ("Evaluation", f'<span id="res-crops">{esc(crops or "—")}</span>'),
                ("Model", f'<code id="res-model">{esc(model or "not written yet")}</code>'),
            ]
        )
        + "</dl></section>"
        '<section><div class="title-row"><h2>Log</h2><span class="muted">last 50 lines</span>'
        '<button type="button" class="secondary" id="log-reload">Reload</button></div>'
        '<pre id="log" class="log">loading…</pre></section>'
        "<section><details><summary>Spec</summary>"
        f'<pre class="log">{esc(spec_text)}</pre></details></section>'
    )
    data = {
        "job-id": rec.id,
        "state": state,
        "cancel-requested": "1" if cancel_requested else "0",
        "can-change": "1" if changes else "0",
        "epochs": epochs,
    }
    return _layout(assets, f"{rec.name} ({rec.id})", body, me=me, page="job", data=data)


def dashboard_router(
    who: Callable[[Request], Caller], readable: Callable[[str, Caller], JobRecord]
) -> APIRouter:
    """The dashboard's routes; ``who`` names a request's user (AuthError when there is none) and
    ``readable`` returns a job the user may read (JobNotFoundError otherwise, also for other teams')."""
    router = APIRouter(include_in_schema=False)
    assets = Assets()

    def me_or_none(request: Request) -> Caller | None:
        try:
            return who(request)
        except AuthError:
            return None

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in ASSETS:
            return Response("not found", status_code=404, media_type="text/plain", headers=SECURITY_HEADERS)
        headers = {**SECURITY_HEADERS, "Cache-Control": "public, max-age=86400"}  # URLs carry the version
        return Response(assets.files[name], media_type=ASSETS[name], headers=headers)

    @router.get("/login")
    def login_form(next_path: str | None = Query(None, alias="next")) -> HTMLResponse:
        return _page(_login_page(assets, next_path=_local_path(next_path)))

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await _form(request)
        next_path = _local_path(form.get("next"))
        if not _same_origin(request):
            refused = _login_page(assets, error="log in from this site's own page", next_path=next_path)
            return _page(refused, 403)
        token = form.get("token", "").strip()
        users: UserStore = request.app.state.users
        try:
            if not token:
                raise AuthError("token: empty; paste the token an admin gave you")
            await run_in_threadpool(users.authenticate, token)
        except AuthError as err:
            return _page(_login_page(assets, error=str(err), next_path=next_path), 401)
        except UnreachableError as err:
            return _page(_login_page(assets, error=str(err), next_path=next_path), 503)
        out = _redirect(next_path)
        out.set_cookie(
            COOKIE,
            token,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return out

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = await _form(request)
        me = await run_in_threadpool(me_or_none, request)
        if me is not None:
            check_csrf(me, form.get("csrf") or request.headers.get(CSRF_HEADER))  # 403 without it
        out = _redirect("/login")
        https = request.url.scheme == "https"
        out.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=https)
        return out

    @router.get("/")
    def queue(request: Request) -> Response:
        me = me_or_none(request)
        if me is None:
            return _to_login(request)
        try:
            rows, hidden = queue_rows(request.app.state.service, me, time.time())
        except UnreachableError as err:
            return _error_page(assets, me, 503, str(err))
        return _page(_queue_page(assets, me, rows, hidden))

    @router.get("/queue.json")
    def queue_json(request: Request) -> JSONResponse:
        me = who(request)  # 401 as JSON: the script sends the browser to the log-in form
        now = time.time()
        rows, hidden = queue_rows(request.app.state.service, me, now)
        body = {"jobs": rows, "hidden": hidden, "now": now}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @router.get("/jobs/{job_id}")
    def job(job_id: str, request: Request) -> Response:
        me = me_or_none(request)
        if me is None:
            return _to_login(request)
        service: JobService = request.app.state.service
        try:
            rec = readable(job_id, me)
            pending = service.pending().get(job_id) if rec.state is JobState.QUEUED else None
        except JobNotFoundError as err:
            return _error_page(assets, me, 404, str(err))
        except UnreachableError as err:
            return _error_page(assets, me, 503, str(err))
        return _page(_job_page(assets, me, rec, pending))

    return router
