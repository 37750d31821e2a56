"""The CLI through the HTTP API prints what it prints on Redis, and exits with the same codes.

Each command runs twice as a user would run it, once with ``ALEXNET_DIST_REDIS_URL`` and once with
``ALEXNET_DIST_SERVER`` and a token (no Redis URL at all), against a real server and redis-server; a
job is driven through its life by the store and the real event publisher, as the dispatcher and
training write it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from apiserver import ApiServer
from jobspecs import spec_file

from alexnet_dist.service.events import job_publisher
from alexnet_dist.service.store import JobState, JobStore

CLI = Path(sys.executable).parent / "alexnet-dist"


class Both:
    """Runs one command on Redis and through the API, as the same user."""

    def __init__(self, api: ApiServer, tmp_path: Path) -> None:
        token = api.add_user("alice", "vision")
        base = {"COLUMNS": "200", "XDG_CONFIG_HOME": str(tmp_path / "config")}
        self.redis_env = {
            **api.env(),
            **base,
            "ALEXNET_DIST_REDIS_URL": api.redis_url,
            "ALEXNET_DIST_USER": "alice",
            "ALEXNET_DIST_TEAM": "vision",
        }
        self.redis_env.pop("ALEXNET_DIST_SERVER")
        self.api_env = {**api.env(token), **base}

    def run(self, *args: str, via: str) -> subprocess.CompletedProcess:
        env = self.redis_env if via == "redis" else self.api_env
        return subprocess.run([str(CLI), *args], env=env, capture_output=True, text=True, timeout=120)

    def same(self, *args: str) -> subprocess.CompletedProcess:
        """Run both ways; assert the same exit code, stdout and stderr; return the API's."""
        direct, through = self.run(*args, via="redis"), self.run(*args, via="api")
        assert (through.returncode, through.stdout, through.stderr) == (
            direct.returncode,
            direct.stdout,
            direct.stderr,
        ), args
        return through


def _drive(store: JobStore, redis_url: str, job_id: str, epochs: int = 3) -> None:
    """The job's life as the dispatcher and a training run write it."""
    assert store.transition(store.get(job_id), JobState.LAUNCHING, message="launching")
    assert store.transition(store.get(job_id), JobState.RUNNING, message="running as parity-1")
    pub = job_publisher(redis_url, store.keys, job_id)
    for epoch in range(1, epochs + 1):
        for step in (2, 4):
            pub.publish(
                {
                    "type": "step",
                    "epoch": epoch,
                    "epochs": epochs,
                    "step": step,
                    "steps_per_epoch": 4,
                    "loss": 2.0 / (epoch + step),
                    "lr": 0.01,
                    "images_per_s": 100.0 + step,
                }
            )
        pub.publish(
            {
                "type": "epoch",
                "epoch": epoch,
                "epochs": epochs,
                "train_loss": 1.0 / epoch,
                "val_top1_error": 0.5 / epoch,
                "val_top5_error": 0.1 / epoch,
                "val_samples": 64,
            }
        )
        time.sleep(0.1)
    final = {"top1_error": 0.125, "top5_error": 0.03125, "ten_crop": True, "val_samples": 64}
    pub.publish({"type": "final", **final})
    pub.close()
    store.store_result(
        job_id,
        {
            **final,
            "epochs": epochs,
            "steps": 4 * epochs,
            "train_seconds": 1.5,
            "model_url": "file:///runs/parity/model.pt",
        },
    )
    assert store.transition(store.get(job_id), JobState.SUCCEEDED, message="finished")


def _ids(text: str) -> str:
    return re.sub(r"parity-[0-9a-f]{8}", "parity-<id>", text)


def test_submit_watch_result_print_the_same_and_exit_the_same(api: ApiServer, tmp_path: Path) -> None:
    both = Both(api, tmp_path)
    spec = spec_file(tmp_path, "parity")
    store = api.store

    # submit: the same line and the same JSON (but for the job's id and times)
    direct, through = both.run("submit", str(spec), via="redis"), both.run("submit", str(spec), via="api")
    assert direct.returncode == through.returncode == 0
    assert _ids(direct.stdout) == _ids(through.stdout) == "parity-<id>  QUEUED  priority 0\n"
    a = json.loads(both.run("submit", str(spec), "--json", "--client-key", "k", via="redis").stdout)
    b = json.loads(both.run("submit", str(spec), "--json", "--client-key", "k", via="api").stdout)
    assert b["id"] == a["id"] and b["created"] is False  # the same key through either path submits once
    varying = {"id", "created", "updated", "seq", "submission_id", "client_key"}
    c = json.loads(both.run("submit", str(spec), "--json", via="api").stdout)
    assert {k: v for k, v in a.items() if k not in varying} == {
        k: v for k, v in c.items() if k not in varying
    }
    assert (c["user"], c["team"], c["state"]) == ("alice", "vision", "QUEUED")

    # watch --json following a running job through the API sees what the store holds, live
    job = c["id"]
    watcher = subprocess.Popen(
        [str(CLI), "watch", job, "--json"],
        env=both.api_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    driver = threading.Thread(target=_drive, args=(store, api.redis_url, job))
    time.sleep(0.5)
    driver.start()
    live_out, live_err = watcher.communicate(timeout=120)
    driver.join()
    assert watcher.returncode == 0, live_err
    live = [json.loads(line) for line in live_out.splitlines()]
    assert [e["type"] for e in live].count("epoch") == 3 and live[-1]["state"] == "SUCCEEDED"

    # replayed after the end, every output is byte for byte the same either way
    replay = both.same("watch", job, "--json")
    assert replay.stdout == live_out
    assert (
        "final top-1 error 0.1250  top-5 error 0.0312 (ten-crop, 64 images)" in both.same("watch", job).stdout
    )
    assert both.same("result", job).stdout == f"{job}: top-1 error 0.1250  top-5 error 0.0312 (ten-crop)\n"
    assert json.loads(both.same("result", job, "--json").stdout)["top5_error"] == 0.03125
    assert json.loads(both.same("status", job, "--json").stdout)["result"]["model_url"].endswith("model.pt")
    both.same("status", job)
    assert job in both.same("list").stdout
    both.same("list", "--json", "--state", "succeeded")

    # refusals: the same one line on stderr and the same exit code
    for args in (
        ("status", "nope-00000000"),
        ("result", a["id"]),
        ("cancel", job),
        ("resume", a["id"]),
        ("watch", "nope-00000000"),
        ("submit", str(tmp_path / "missing.toml")),
    ):
        refused = both.same(*args)
        assert refused.returncode != 0 and refused.stderr.count("\n") == 1, (args, refused.stderr)
    bad = tmp_path / "bad.toml"
    bad.write_text(spec.read_text().replace("val.json", "nowhere.json"))
    refused = both.same("submit", str(bad))
    assert refused.returncode == 2 and "data.val:" in refused.stderr and "not found" in refused.stderr
    # a change runs once: cancel one queued job each way, and both print the same line
    d = json.loads(both.run("submit", str(spec), "--json", via="redis").stdout)["id"]
    direct, through = both.run("cancel", d, via="redis"), both.run("cancel", a["id"], via="api")
    assert (
        (direct.returncode, _ids(direct.stdout))
        == (through.returncode, _ids(through.stdout))
        == (0, "parity-<id>  CANCELLED  cancelled while queued\n")
    )


def test_login_keeps_the_token_for_the_server_with_mode_0600(api: ApiServer, tmp_path: Path) -> None:
    token = api.add_user("dana", "vision")
    env = {**api.env(), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    wrong = subprocess.run(
        [str(CLI), "login", "--token-stdin"], input="adt_wrong\n", env=env, capture_output=True, text=True
    )
    assert wrong.returncode != 0 and "token: not valid" in wrong.stderr
    creds = tmp_path / "config" / "alexnet-dist" / "credentials.json"
    assert not creds.exists()  # a refused token is not kept
    ok = subprocess.run(
        [str(CLI), "login", "--token-stdin"], input=token + "\n", env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert f"logged in to {api.url} as dana (user, team vision)" in ok.stdout
    assert stat.S_IMODE(os.stat(creds).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(creds.parent).st_mode) == 0o700
    assert json.loads(creds.read_text()) == {api.url: token}
    listed = subprocess.run(
        [str(CLI), "list"], env=env, capture_output=True, text=True
    )  # no ALEXNET_DIST_TOKEN
    assert listed.returncode == 0, listed.stderr
    subprocess.run([str(CLI), "logout"], env=env, check=True, capture_output=True)
    assert json.loads(creds.read_text()) == {}
    after = subprocess.run([str(CLI), "list"], env=env, capture_output=True, text=True)
    assert after.returncode != 0 and "no token" in after.stderr


@pytest.mark.parametrize("url", ["ftp://host", "http://127.0.0.1:1"])
def test_a_bad_or_dead_server_is_one_line(api: ApiServer, url: str) -> None:
    env = {**api.env("adt_x"), "ALEXNET_DIST_SERVER": url}
    proc = subprocess.run([str(CLI), "list"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert url in proc.stderr
