"""A real `alexnet-dist server` (uvicorn, over HTTP) on the session's redis-server, and its users: the
`api_server` and `api` fixtures (a pytest plugin of the root conftest) and `start_api_server`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from conftest import RedisServer, free_port, wait_for_port

from alexnet_dist.service.connection import connect
from alexnet_dist.service.store import JobStore
from alexnet_dist.service.users import UserStore

BIN = Path(sys.executable).parent


@dataclass
class ApiServer:
    url: str
    redis_url: str
    log: Path

    @property
    def store(self) -> JobStore:
        return JobStore(connect(self.redis_url))

    def add_user(self, name: str, team: str, *, admin: bool = False) -> str:
        """A user of the server; returns their token (what `alexnet-dist admin user add` prints)."""
        store = self.store
        _, token = UserStore(store.client, store.keys).add(name, team=team, admin=admin, replace=True)
        return token

    def env(self, token: str | None = None, **extra: str) -> dict[str, str]:
        """The environment of a CLI that goes through this server."""
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "ALEXNET_DIST_SERVER": self.url}
        env.pop("ALEXNET_DIST_REDIS_URL", None)  # a user of the API has no Redis URL
        if token:
            env["ALEXNET_DIST_TOKEN"] = token
        return {**env, **extra}


def start_api_server(
    redis_url: str, log: Path, *, args: tuple[str, ...] = (), **env: str
) -> tuple[subprocess.Popen, ApiServer]:
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "alexnet-dist"), "server", "--port", str(port), *args],
        # no Ray cluster unless a test gives one: a dashboard port nothing listens on
        env={
            **os.environ,
            "ALEXNET_DIST_REDIS_URL": redis_url,
            "ALEXNET_DIST_RAY_DASHBOARD": f"http://127.0.0.1:{free_port()}",
            **env,
        },  # fmt: skip
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=30)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"the API server did not start:\n{log.read_text()[-3000:]}") from None
    return proc, ApiServer(f"http://127.0.0.1:{port}", redis_url, log)


@pytest.fixture(scope="module")
def api_server(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """One server process per test module, on the session's Redis."""
    proc, server = start_api_server(redis_server.url, tmp_path_factory.mktemp("api") / "server.log")
    yield server
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def api(api_server: ApiServer) -> ApiServer:
    """The module's server with an empty store (Redis flushed before each test)."""
    client = redis.Redis.from_url(api_server.redis_url)
    client.flushall()
    client.close()
    return api_server
