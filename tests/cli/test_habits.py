"""The CLI as `ray job`, `sky jobs` and `kubectl` users expect it, run as a user runs it (subprocesses of
the installed `alexnet-dist`) on a real redis-server: exit codes that tell the outcome, `submit --follow`
and `wait`, jobs named by a prefix or a name, plain progress lines in a pipe, `--version`, completion,
`-q`, NO_COLOR, and a store command that imports neither torch nor Ray."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port
from jobspecs import spec_file

from alexnet_dist.errors import (
    AmbiguousJobError,
    AuthError,
    ConfigError,
    JobFailedError,
    JobNotFinishedError,
    JobNotFoundError,
    UnreachableError,
)
from alexnet_dist.service.connection import connect
from alexnet_dist.service.events import job_publisher
from alexnet_dist.service.store import JobState, JobStore

CLI = Path(sys.executable).parent / "alexnet-dist"
ROOT = Path(__file__).resolve().parents[2]


def run(redis_url: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "ALEXNET_DIST_SERVER"}
    full = {**base, "ALEXNET_DIST_REDIS_URL": redis_url, "COLUMNS": "200", **env}
    return subprocess.run([str(CLI), *args], env=full, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def habit_spec(tmp_path: Path) -> Path:
    return spec_file(tmp_path, "habit")


def submit(redis_url: str, habit_spec: Path, *args: str) -> str:
    proc = run(redis_url, "submit", str(habit_spec), "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["id"]


def drive(redis_url: str, job_id: str, end: JobState, *, epochs: int = 3, delay: float = 0.0) -> None:
    """The job's life as the dispatcher and a training run write it, ending in ``end``."""
    time.sleep(delay)
    store = JobStore(connect(redis_url))
    assert store.transition(store.get(job_id), JobState.LAUNCHING, message="launching")
    assert store.transition(store.get(job_id), JobState.RUNNING, message="running")
    pub = job_publisher(redis_url, store.keys, job_id)
    for epoch in range(1, epochs + 1):
        for step in range(1, 11):
            pub.publish(
                {
                    "type": "step",
                    "epoch": epoch,
                    "epochs": epochs,
                    "step": step,
                    "steps_per_epoch": 10,
                    "loss": 1.0 / step,
                    "lr": 0.01,
                    "images_per_s": 50.0,
                }
            )
        pub.publish(
            {
                "type": "epoch",
                "epoch": epoch,
                "epochs": epochs,
                "train_loss": 0.5 / epoch,
                "val_top1_error": 0.3 / epoch,
                "val_top5_error": 0.1 / epoch,
            }
        )
    if end is JobState.SUCCEEDED:
        pub.publish(
            {"type": "final", "top1_error": 0.1, "top5_error": 0.01, "ten_crop": True, "val_samples": 64}
        )
        pub.close()
        store.store_result(job_id, {"top1_error": 0.1, "top5_error": 0.01, "ten_crop": True})
    else:
        pub.close()
    message = {JobState.SUCCEEDED: "finished", JobState.FAILED: "worker died: out of memory"}[end]
    assert store.transition(store.get(job_id), end, message=message)


def test_exit_codes_tell_the_outcome(redis_url: str, habit_spec: Path, tmp_path: Path) -> None:
    ok, failed, queued, cancelled = (submit(redis_url, habit_spec) for _ in range(4))
    drive(redis_url, ok, JobState.SUCCEEDED)
    drive(redis_url, failed, JobState.FAILED)
    assert run(redis_url, "cancel", cancelled).returncode == 0

    def code(*args: str, **env: str) -> tuple[int, str]:
        proc = run(redis_url, *args, **env)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc.returncode, proc.stderr

    assert code("result", ok)[0] == 0
    assert code("watch", ok)[0] == 0
    assert code("wait", ok)[0] == 0
    assert code("result", failed) == (
        JobFailedError.exit_code,
        f"alexnet-dist: error: job {failed}: FAILED: worker died: out of memory\n",
    )
    assert code("watch", failed)[0] == code("wait", failed)[0] == JobFailedError.exit_code == 3
    assert code("watch", cancelled)[0] == code("result", cancelled)[0] == 3
    assert code("result", queued)[0] == JobNotFinishedError.exit_code == 4
    t0 = time.monotonic()
    waited = code("wait", queued, "--timeout", "1")
    assert waited[0] == 4 and "still QUEUED after 1 s" in waited[1]
    assert time.monotonic() - t0 < 30
    assert code("watch", queued, "--no-follow")[0] == 0  # what is there so far; the job has not ended
    assert code("status", "nope-00000000")[0] == JobNotFoundError.exit_code == 5
    assert code("submit", str(tmp_path / "missing.toml"))[0] == ConfigError.exit_code == 2
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\x00\xff\xfe" * 10)
    assert code("submit", str(binary)) == (
        2,
        f"alexnet-dist: error: {binary}: not a text file (not UTF-8); a spec is TOML or JSON text\n",
    )
    down = code("list", ALEXNET_DIST_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert down[0] == UnreachableError.exit_code == 6 and "Redis unreachable" in down[1]
    api_down = code("list", ALEXNET_DIST_SERVER=f"http://127.0.0.1:{free_port()}", ALEXNET_DIST_TOKEN="adt_x")
    assert api_down[0] == 6 and "API server unreachable" in api_down[1]
    no_token = code(
        "list", ALEXNET_DIST_SERVER="http://127.0.0.1:1", ALEXNET_DIST_TOKEN="", XDG_CONFIG_HOME=str(tmp_path)
    )
    assert no_token[0] == AuthError.exit_code == 7
    assert code("status", "--bogus-option")[0] == 2  # usage errors too


def test_submit_follow_exits_with_the_jobs_outcome(redis_url: str, habit_spec: Path) -> None:
    """`submit --follow && deploy` must not deploy a failed model."""
    store = JobStore(connect(redis_url))
    for end, expected in ((JobState.FAILED, 3), (JobState.SUCCEEDED, 0)):
        before = set(store.ids())

        def drive_new(before: set[str] = before, end: JobState = end) -> None:
            deadline = time.monotonic() + 60
            while not (new := set(store.ids()) - before) and time.monotonic() < deadline:
                time.sleep(0.05)
            drive(redis_url, new.pop(), end, delay=0.3)

        t = threading.Thread(target=drive_new)
        t.start()
        proc = run(redis_url, "submit", str(habit_spec), "--follow")
        t.join()
        assert proc.returncode == expected, (end, proc.stdout, proc.stderr)
        lines = proc.stdout.splitlines()
        assert re.fullmatch(r"habit-[0-9a-f]{8}  QUEUED  priority 0", lines[0])
        assert f"{end.value} attempt 1:" in lines[-1] or f"{end.value} attempt 1:" in lines[-2]
        assert sum(line.startswith("epoch ") and " done: " in line for line in lines) == 3


def test_watch_in_a_pipe_prints_plain_lines_as_the_run_moves(redis_url: str, habit_spec: Path) -> None:
    job = submit(redis_url, habit_spec)
    watcher = subprocess.Popen(
        [str(CLI), "watch", job, "--step-lines", "5"],
        env={**os.environ, "ALEXNET_DIST_REDIS_URL": redis_url},
        stdout=subprocess.PIPE,
        text=True,
    )
    first = watcher.stdout.readline()  # the header arrives before the job has moved: not held back
    assert first.startswith(f"{job} (habit): QUEUED")
    drive(redis_url, job, JobState.SUCCEEDED, delay=0.2)
    rest = watcher.stdout.read().splitlines()
    assert watcher.wait(30) == 0
    assert "\x1b[" not in "".join(rest)  # no terminal codes in a log file
    assert rest[0] == "QUEUED attempt 1: queued"
    epochs = [line for line in rest if " done: " in line]
    assert epochs == [
        f"epoch {e}/3 done: train loss {0.5 / e:.4f}  top-1 err {0.3 / e:.4f}  top-5 err {0.1 / e:.4f}"
        for e in (1, 2, 3)
    ]
    steps = [line for line in rest if " step " in line]
    assert len(steps) == 3 * 10 // 5 and steps[0].startswith("epoch 1/3 step 5/10: loss 0.2000")
    assert rest[-2].startswith("final top-1 error 0.1000  top-5 error 0.0100 (ten-crop")
    assert rest[-1] == "SUCCEEDED attempt 1: finished"


def test_a_job_is_named_by_its_id_a_unique_prefix_or_a_unique_name(
    redis_url: str, habit_spec: Path, tmp_path: Path
) -> None:
    first = submit(redis_url, habit_spec)
    assert json.loads(run(redis_url, "status", first[:-4], "--json").stdout)["id"] == first
    assert json.loads(run(redis_url, "status", "habit", "--json").stdout)["id"] == first  # the only one
    second = submit(redis_url, habit_spec)
    ambiguous = run(redis_url, "status", "habit")
    assert ambiguous.returncode == AmbiguousJobError.exit_code == 2
    assert ambiguous.stderr.startswith("alexnet-dist: error: job habit: ambiguous, 2 jobs match (")
    assert first in ambiguous.stderr and second in ambiguous.stderr
    # a longer prefix picks one out; every command takes it
    common = os.path.commonprefix([first, second])
    pick = second[: len(common) + 1]
    assert run(redis_url, "cancel", pick).stdout.startswith(f"{second}  CANCELLED")
    assert run(redis_url, "status", "hab-nothing").returncode == 5


def test_version_completion_quiet_and_no_color(redis_url: str, habit_spec: Path) -> None:
    from alexnet_dist.cli.app import version

    assert run(redis_url, "--version").stdout == f"alexnet-dist {version()}\n"
    completed = run(
        redis_url, _ALEXNET_DIST_COMPLETE="complete_bash", COMP_WORDS="alexnet-dist wa", COMP_CWORD="1"
    )
    assert completed.stdout.split() == ["watch", "wait"] or set(completed.stdout.split()) == {"watch", "wait"}
    colour = re.compile(r"\x1b\[[0-9;]*3[0-7]m")
    coloured = run(redis_url, "submit", str(habit_spec), FORCE_COLOR="1")
    assert colour.search(coloured.stdout), coloured.stdout
    plain = run(redis_url, "submit", str(habit_spec), FORCE_COLOR="1", NO_COLOR="1")
    assert plain.returncode == 0 and not colour.search(plain.stdout), plain.stdout

    # -v: this package's debug lines on stderr; -q: none below warnings; stdout the same either way
    verbose, normal, quiet = (run(redis_url, *flags, "list", "--json") for flags in (["-v"], [], ["-q"]))
    assert "DEBUG alexnet_dist.service.connection: redis://127.0.0.1:" in verbose.stderr
    assert normal.stderr == quiet.stderr == ""
    assert verbose.stdout == normal.stdout == quiet.stdout and len(json.loads(quiet.stdout)) == 2


def test_store_commands_import_neither_torch_nor_ray(redis_url: str, habit_spec: Path) -> None:
    job = submit(redis_url, habit_spec)
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from alexnet_dist.cli import app\n"
        f"for args in (['list'], ['status', {job!r}], ['submit', {str(habit_spec)!r}], ['result', {job!r}],\n"
        f"             ['watch', {job!r}, '--no-follow'], ['cancel', {job!r}]):\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    not_finished = type(r.exception).__name__ == 'JobNotFinishedError'  # result of a queued job\n"
        "    assert r.exit_code == 0 or not_finished, (args, r.output)\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'boto3', 'numpy', 'PIL', 'matplotlib', 'fastapi')\n"
        "               if m in sys.modules)\n"
        "print(heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ALEXNET_DIST_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_shards_build_writes_manifests_only_beside_the_shards(
    tmp_path: Path, fashion_mnist_dir: Path
) -> None:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            str(CLI),
            "shards",
            "build",
            str(fashion_mnist_dir),
            str(out),
            "--format",
            "fashion-mnist",
            "--limit",
            "40",
            "--shard-size",
            "20",
            "--resize-to",
            "36",
            "--processes",
            "1",
            "--split",
            "test",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "fashion-mnist-test.json").exists()
    assert list(cwd.iterdir()) == []  # no ./shards/ copy in whatever directory it ran in


def test_every_jobs_file_the_help_and_the_readme_suggest_exists(redis_url: str) -> None:
    named = set(re.findall(r"jobs/[\w.-]+\.toml", run(redis_url, "submit", "--help", COLUMNS="300").stdout))
    named |= set(re.findall(r"jobs/[\w.-]+\.toml", (ROOT / "README.md").read_text()))
    assert "jobs/fashion-mnist.toml" in named
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, missing
