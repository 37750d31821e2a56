"""Shared fixtures: a real redis-server and a real S3 server (moto, over HTTP) on free local ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["apiserver"]  # the API server fixtures (tests/apiserver.py)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class RedisServer:
    """A redis-server process of the test's own; ``restart()`` keeps its data dir (AOF)."""

    port: int
    dir: Path
    args: list[str]
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server not installed: run `make setup`")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is not None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()


def start_redis(tmp: Path, *args: str) -> RedisServer:
    server = RedisServer(port=free_port(), dir=tmp, args=list(args))
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"), "--appendonly", "yes")
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server, flushed before each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@dataclass
class S3Server:
    endpoint_url: str

    def client(self):  # a boto3 S3 client for the test's own checks and setup
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server in its own process, over real HTTP; credentials are dummies moto accepts."""
    port = free_port()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    proc = subprocess.Popen(
        [str(Path(os.sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server, with AWS_ENDPOINT_URL pointing at it for code that reads the standard settings."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    return s3_server


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 5 MiB tmpfs: room for one checkpoint of the small preset (3.5 MiB), not for two."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"{FASHION_MNIST}: Fashion-MNIST missing; run `make setup` (dataset-fashion-mnist)")
    return FASHION_MNIST


@dataclass(frozen=True)
class RayHead:
    """A local Ray head started with ``ray start --head`` (what users run), on ports of its own."""

    dashboard_url: str  # the Ray Jobs API (ALEXNET_DIST_RAY_DASHBOARD)
    address: str  # the GCS address (RAY_ADDRESS)
    log: Path  # the head's output, for a failing test's message


class RayHeadProcess:
    """``ray start --head --block`` in a process group of its own, with 2 CPUs, on fixed ports, so it can
    be killed outright (every Ray process of it: GCS, raylet, dashboard, workers, job drivers) and a new
    head started in its place at the same address. Started with the venv's bin on PATH, so Ray Jobs find
    the ``alexnet-dist`` entrypoint."""

    def __init__(self, log_path: Path, *, num_cpus: int = 2) -> None:
        self.num_cpus = num_cpus
        self.ports = {
            k: free_port()
            for k in ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port")
        }
        self.head = RayHead(
            f"http://127.0.0.1:{self.ports['dashboard-port']}", f"127.0.0.1:{self.ports['port']}", log_path
        )
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> RayHead:
        import sys

        from alexnet_dist.service.launcher import RayJobsLauncher

        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        with open(self.head.log, "a") as log:
            self.proc = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "ray"),
                    "start",
                    "--head",
                    "--block",
                    f"--num-cpus={self.num_cpus}",
                    "--disable-usage-stats",
                    "--dashboard-host=127.0.0.1",
                    *[f"--{k}={v}" for k, v in self.ports.items()],
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                RayJobsLauncher(self.head.dashboard_url).nodes()
                return self.head
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(1)

    def kill(self, sig: int | None = None) -> None:
        """End every process of this head (``ray stop`` would stop every Ray on the machine)."""
        _kill_group(self.proc, sig)
        self.proc = None


def _kill_group(proc: subprocess.Popen | None, sig: int | None) -> None:
    import signal

    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig or signal.SIGTERM)
        proc.wait(3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


class RayNodeProcess:
    """A worker node joining a head: ``ray start --address --block`` with a raylet of its own, in a
    process group of its own, so that killing it takes the node and its workers down at once, as a
    reclaimed spot instance does. Every port it opens is its own (several raylets share this machine);
    a custom resource ``node:<name>`` tells the test which node is which."""

    def __init__(self, head: RayHead, name: str, log_path: Path, *, num_cpus: int = 1, base: int) -> None:
        self.head, self.name, self.log, self.num_cpus, self.base = head, name, log_path, num_cpus, base
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        import json
        import sys

        from alexnet_dist.service.launcher import RayJobsLauncher

        ports = {
            k: free_port()
            for k in (
                "node-manager-port",
                "object-manager-port",
                "runtime-env-agent-port",
                "dashboard-agent-grpc-port",
                "dashboard-agent-listen-port",
                "metrics-export-port",
            )
        }
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",  # the head's token (~/.ray/auth_token), as its own nodes need
        }
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "ray"),
                    "start",
                    "--block",
                    f"--address={self.head.address}",
                    f"--num-cpus={self.num_cpus}",
                    "--disable-usage-stats",
                    f"--resources={json.dumps({f'node:{self.name}': 1})}",
                    f"--min-worker-port={self.base}",
                    f"--max-worker-port={self.base + 200}",
                    *[f"--{k}={v}" for k, v in ports.items()],
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        launcher = RayJobsLauncher(self.head.dashboard_url)
        deadline = time.monotonic() + timeout
        while not any(f"node:{self.name}" in n for n in launcher.nodes()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"Ray node {self.name} did not join; see {self.log}")
            time.sleep(0.5)

    def kill(self, sig: int | None = None) -> None:
        _kill_group(self.proc, sig)
        self.proc = None


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A local Ray head of the module's own (own ports, own process group) with 2 CPUs."""
    process = RayHeadProcess(tmp_path_factory.mktemp("ray") / "head.log")
    try:
        yield process.start()
    finally:
        process.kill()
