"""CLI commands of the job service: submit, list, status, watch, cancel, resume, result, logs, dispatcher,
and run-job (the entrypoint of each Ray Job the dispatcher launches).

Each command parses its arguments, calls one operation of :class:`JobService` and prints what it returns
(rich tables and progress bars, or JSON with ``--json``); the operations' errors become exit codes in
:func:`alexnet_dist.cli.main`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from alexnet_dist.cli.app import app
from alexnet_dist.errors import ConfigError, JobYielded, NodeLostError
from alexnet_dist.service.connection import connect
from alexnet_dist.service.launcher import RayJobsLauncher
from alexnet_dist.service.operations import JobService, outcome_error
from alexnet_dist.service.store import JobState, JobStore
from alexnet_dist.settings import Settings, load_settings
from alexnet_dist.spec import load_spec

log = logging.getLogger(__name__)
out = Console()
err_console = Console(stderr=True)


def _store(settings: Settings) -> JobStore:
    return JobStore(connect(settings.redis_url), prefix=settings.redis_prefix)


def _service(settings: Settings) -> JobService:
    """A user's job operations: through the HTTP API when ALEXNET_DIST_SERVER is set, else on Redis."""
    if settings.server_url:
        from alexnet_dist.api.client import ApiClient

        return ApiClient(settings.server_url, settings.token)  # type: ignore[return-value]  (same methods)
    return _store_service(settings)


def _store_service(settings: Settings) -> JobService:
    """The operations on Redis itself: what the service's own processes (run-job) use."""
    return JobService(
        _store(settings),
        endpoint_url=settings.s3_endpoint_url,
        launcher=lambda: RayJobsLauncher(settings.ray_dashboard_url),
    )


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, int | float) and not isinstance(x, bool) else "-"


@app.command()
def submit(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="job spec TOML, e.g. jobs/fashion-mnist.toml"),
    priority: int | None = typer.Option(None, help="overrides the spec's priority; higher runs first"),
    set_: list[str] = typer.Option([], "--set", help="override a field: --set train.epochs=3"),
    client_key: str | None = typer.Option(None, help="idempotency key: the same key submits once"),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="then show progress and exit with the job's outcome (0: succeeded)"
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Queue a job; nothing is queued if the spec or its manifests are wrong."""
    spec = load_spec(spec_path, set_)
    settings = load_settings()
    service = _service(settings)
    rec, created = service.submit(
        spec, priority=priority, client_key=client_key, user=settings.user, team=settings.team
    )
    if as_json:
        _print_json({**rec.to_dict(), "created": created})
    else:
        note = "" if created else " (already submitted with this client key)"
        out.print(f"{rec.id}  {rec.state.value}  priority {rec.priority}{note}")
    if follow:
        _follow(service, rec.id, as_json=as_json, follow=True, step_lines=10)


@app.command("list")
def list_jobs(
    state: JobState | None = typer.Option(None, case_sensitive=False, help="only jobs in this state"),
    limit: int | None = typer.Option(None, help="only the newest N"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Jobs in submission order; a queued job says where it stands in the queue and why it waits."""
    service = _service(load_settings())
    records = service.list(state, limit=limit)
    pending = service.pending()
    if as_json:
        _print_json([{**r.to_dict(spec=False), "pending": pending.get(r.id)} for r in records])
        return
    table = Table("job", "state", "attempt", "priority", "team", "workers", "message")
    for r in records:
        scaling = r.spec.scaling
        waits = pending.get(r.id) if r.state is JobState.QUEUED else None
        message = f"#{waits['position']}: {waits['reason']}" if waits else r.message
        table.add_row(
            r.id,
            r.state.value,
            str(r.attempt),
            str(r.priority),
            r.team,
            f"{scaling.workers}x{scaling.devices}",
            message,
        )
    out.print(table)


@app.command()
def status(
    job_id: str = typer.Argument(..., metavar="JOB", help="a job id, a unique prefix of one, or a name"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """One job's record; a queued one with its place in the queue, why it waits and when it may start."""
    service = _service(load_settings())
    rec = service.get(job_id)
    waits = service.pending().get(rec.id) if rec.state is JobState.QUEUED else None
    if as_json:
        _print_json({**rec.to_dict(), "pending": waits})
        return
    table = Table(show_header=False)
    if waits:
        table.add_row("position", str(waits["position"]))
        table.add_row("waiting", str(waits["reason"]))
        for key in ("eta_start", "eta_finish"):
            at = waits.get(key)
            table.add_row(key, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "unknown")
    for k, v in rec.to_dict(spec=False).items():
        if k == "result" and isinstance(v, dict):  # the figures people look for; --json has all of it
            view = "ten-crop" if v.get("ten_crop") else "central crop"
            v = (
                f"top-1 error {_fmt(v.get('top1_error'))}, top-5 error {_fmt(v.get('top5_error'))} ({view}, "
                f"{v.get('val_samples')} images); {v.get('epochs')} epochs in "
                f"{_fmt(v.get('train_seconds'), 1)} s; model {v.get('model_url')}"
            )
        elif k in ("created", "updated") and isinstance(v, float):
            v = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
        table.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    out.print(table)


class WatchView:
    """Turns a job's events into two progress bars (epochs; steps of the epoch) and state lines."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.epochs = progress.add_task("epoch", total=None, info="")
        self.steps = progress.add_task("step", total=None, info="")
        self.last_eval = ""

    def show(self, event: dict[str, Any]) -> None:
        kind, p = event.get("type"), self.progress
        if kind == "state":
            p.console.print(
                f"[bold]{event.get('state')}[/] attempt {event.get('attempt')}: {event.get('message')}"
            )
        elif kind == "step":
            p.update(self.epochs, total=event.get("epochs"), completed=max(0, event.get("epoch", 1) - 1))
            info = f"loss {_fmt(event.get('loss'))}  lr {_fmt(event.get('lr'), 5)}  "
            info += f"{_fmt(event.get('images_per_s'), 1)} img/s"
            p.update(
                self.steps, total=event.get("steps_per_epoch"), completed=event.get("step", 0), info=info
            )
        elif kind == "epoch":
            self.last_eval = (
                f"train loss {_fmt(event.get('train_loss'))}  top-1 err {_fmt(event.get('val_top1_error'))}  "
                f"top-5 err {_fmt(event.get('val_top5_error'))}"
            )
            p.update(
                self.epochs, total=event.get("epochs"), completed=event.get("epoch", 0), info=self.last_eval
            )
        elif kind == "final":
            crops = "ten-crop" if event.get("ten_crop") else "center crop"
            p.console.print(
                f"[bold green]final[/] top-1 error {_fmt(event.get('top1_error'))}  top-5 error "
                f"{_fmt(event.get('top5_error'))} ({crops}, {event.get('val_samples')} images)"
            )


class LineView:
    """The same events as plain lines, for a log file or CI: each state, every ``step_lines``-th step
    event (0: none), each epoch and the final evaluation, one line each, flushed as they come."""

    def __init__(self, console: Console, step_lines: int) -> None:
        self.console = console
        self.step_lines = step_lines
        self.steps_seen = 0

    def show(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        line = ""
        if kind == "state":
            line = f"{event.get('state')} attempt {event.get('attempt')}: {event.get('message')}"
        elif kind == "step":
            self.steps_seen += 1
            if self.step_lines and self.steps_seen % self.step_lines == 0:
                line = (
                    f"epoch {event.get('epoch')}/{event.get('epochs')} step {event.get('step')}/"
                    f"{event.get('steps_per_epoch')}: loss {_fmt(event.get('loss'))}  lr "
                    f"{_fmt(event.get('lr'), 5)}  {_fmt(event.get('images_per_s'), 1)} img/s"
                )
        elif kind == "epoch":
            line = (
                f"epoch {event.get('epoch')}/{event.get('epochs')} done: train loss "
                f"{_fmt(event.get('train_loss'))}  top-1 err {_fmt(event.get('val_top1_error'))}  top-5 err "
                f"{_fmt(event.get('val_top5_error'))}"
            )
        elif kind == "final":
            crops = "ten-crop" if event.get("ten_crop") else "center crop"
            line = (
                f"final top-1 error {_fmt(event.get('top1_error'))}  top-5 error "
                f"{_fmt(event.get('top5_error'))} ({crops}, {event.get('val_samples')} images)"
            )
        if line:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            self.console.file.flush()


def _follow(service: JobService, job_id: str, *, as_json: bool, follow: bool, step_lines: int) -> None:
    """Print a job's events (JSON lines, progress bars on a terminal, plain lines elsewhere), then exit
    with its outcome: :class:`JobFailedError` (exit 3) if it ended FAILED or CANCELLED."""
    events = service.watch(job_id, follow=follow)
    if as_json:
        for _, event in events:
            _print_json(event)
    elif not out.is_terminal:
        view = LineView(out, step_lines)
        for _, event in events:
            view.show(event)
    else:
        columns = (
            TextColumn("{task.description:>5}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        )
        with Progress(*columns, console=out, transient=False) as progress:
            bars = WatchView(progress)
            for _, event in events:
                bars.show(event)
    error = outcome_error(service.get(job_id))
    if error is not None:
        raise error


@app.command()
def watch(
    job_id: str = typer.Argument(..., metavar="JOB", help="a job id, a unique prefix of one, or a name"),
    as_json: bool = typer.Option(False, "--json", help="print events as JSON lines"),
    follow: bool = typer.Option(True, help="keep waiting for new events until the job ends"),
    step_lines: int = typer.Option(
        10, help="when not a terminal: a line every N-th logged step (0: epochs only)", min=0
    ),
) -> None:
    """Live progress of a job from its event stream; safe to stop and start again. Exits 0 if the job
    succeeded (or, with --no-follow, has not ended), 3 if it failed or was cancelled."""
    service = _service(load_settings())
    rec = service.get(job_id)
    if not as_json:
        out.print(f"{rec.id} ({rec.name}): {rec.state.value}, attempt {rec.attempt}", highlight=False)
    _follow(service, rec.id, as_json=as_json, follow=follow, step_lines=step_lines)


@app.command("wait")
def wait_cmd(
    job_id: str = typer.Argument(..., metavar="JOB", help="a job id, a unique prefix of one, or a name"),
    timeout: float | None = typer.Option(None, help="give up after this many seconds (exit 4)", min=0),
) -> None:
    """Wait for a job to end, quietly: exit 0 if it succeeded, 3 if it failed or was cancelled, 4 if
    --timeout passed first."""
    rec = _service(load_settings()).wait(job_id, timeout_s=timeout)
    out.print(f"{rec.id}  {rec.state.value}", highlight=False)


@app.command()
def cancel(
    job_id: str = typer.Argument(..., metavar="JOB", help="a job id, a unique prefix of one, or a name"),
) -> None:
    """Cancel a job: at once if queued; a running one's Ray Job is stopped by the dispatcher."""
    rec = _service(load_settings()).cancel(job_id)
    out.print(f"{rec.id}  {rec.state.value}  {rec.message}")


@app.command()
def resume(
    job_id: str = typer.Argument(..., metavar="JOB", help="a job id, a unique prefix of one, or a name"),
) -> None:
    """Queue a FAILED or CANCELLED job again; it continues from its newest checkpoint."""
    rec = _service(load_settings()).resume(job_id)
    out.print(f"{rec.id}  {rec.state.value}  attempt {rec.attempt}")


@app.command()
def result(
    job_id: str = typer.Argument(..., metavar="JOB", help="a job id, a unique prefix of one, or a name"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The final top-1 and top-5 error. Exits 0 if the job succeeded, 3 if it failed or was cancelled,
    4 if it has not finished yet."""
    r = _service(load_settings()).result(job_id)
    if as_json:
        _print_json(r)
        return
    crops = "ten-crop" if r.get("ten_crop") else "center crop"
    top1, top5 = _fmt(r.get("top1_error")), _fmt(r.get("top5_error"))
    out.print(f"{r['job_id']}: top-1 error {top1}  top-5 error {top5} ({crops})")


@app.command()
def logs(
    job_id: str = typer.Argument(..., metavar="JOB", help="a job id, a unique prefix of one, or a name"),
    attempt: int | None = typer.Option(None, help="default: the current attempt"),
    tail: int | None = typer.Option(None, "--tail", "-n", help="only the last N lines", min=1),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new lines until the job ends"),
) -> None:
    """The Ray Job's driver log."""
    service = _service(load_settings())
    if follow:
        if attempt is not None:
            raise ConfigError("--follow reads the current attempt's log; leave out --attempt")
        first = True
        for part in service.follow_logs(job_id):
            if first and tail:
                part = "".join(part.splitlines(keepends=True)[-tail:])
            first = False
            sys.stdout.write(part)
            sys.stdout.flush()
        return
    text = service.logs(job_id, attempt=attempt)
    if tail:
        text = "".join(text.splitlines(keepends=True)[-tail:])
    sys.stdout.write(text)


@app.command()
def dispatcher(
    interval: float = typer.Option(1.0, help="seconds between passes"),
    lock_ttl: float = typer.Option(10.0, help="seconds before a dead dispatcher's lock frees"),
) -> None:
    """Run the dispatcher service (one is active; others wait to take over)."""
    import signal
    import threading

    from alexnet_dist.service.dispatcher import Dispatcher
    from alexnet_dist.service.launcher import job_env
    from alexnet_dist.service.notify import Notifier, StateFollower
    from alexnet_dist.service.resources import Quota

    settings = load_settings()
    store = _store(settings)
    d = Dispatcher(
        store,
        RayJobsLauncher(settings.ray_dashboard_url),
        env=job_env(settings),
        interval_s=interval,
        lock_ttl_s=lock_ttl,
        quotas={team: Quota(**limits) for team, limits in settings.quotas.items()},
        usage_half_life_s=settings.usage_half_life_s,
        min_run_s=settings.min_run_s,
        endpoint_url=settings.s3_endpoint_url,
    )
    # Webhooks (the service's and the jobs' own): a follower of the store's changes stream in a thread of
    # its own, with its own lock, so a receiver that is down never slows a dispatcher pass.
    secret = settings.webhook_secret.encode() or None
    notifier = Notifier(list(settings.webhooks), secret=secret, slack=settings.webhook_slack)
    follower = StateFollower(store.client, store.keys, notifier)
    follower.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("dispatcher %s: waiting for the lock on %s", d.token[:8], store.keys.dispatcher_lock)
    try:
        d.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        follower.close(10)


@app.command("run-job", hidden=True)
def run_job(job_id: str, attempt: int = typer.Option(..., help="the attempt this Ray Job runs")) -> None:
    """Entrypoint of a Ray Job: train the job's spec and store its result."""
    from alexnet_dist.service.events import job_events
    from alexnet_dist.training.driver import run_training

    settings = load_settings()
    service = _store_service(settings)
    rec = service.current_attempt(job_id, attempt)
    events = job_events(settings.redis_url, service.store.keys, job_id)
    signal = service.yield_signal(job_id, settings.redis_url)
    try:
        res = run_training(rec.spec, run_name=job_id, settings=settings, events=events, yield_signal=signal)
    except JobYielded as yielded:
        service.yielded(job_id, attempt)
        out.print(f"{job_id}: {yielded}")
        return
    except NodeLostError as lost:
        service.node_lost(job_id, attempt, str(lost))  # the dispatcher queues it again, no retry spent
        raise
    service.store_result(job_id, res.to_dict())
    out.print(f"{job_id}: stored result")
