"""No command waits forever on a Ray that is not there: a dead RAY_ADDRESS is one line at once, and no
RAY_ADDRESS means a fresh local Ray, whatever an earlier cluster left in /tmp/ray."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from jobspecs import spec_file

from alexnet_dist.errors import ClusterError
from alexnet_dist.settings import Settings
from alexnet_dist.training.driver import ray_address

CLI = Path(sys.executable).parent / "alexnet-dist"


def test_no_ray_address_is_a_fresh_local_ray_and_a_live_one_is_used() -> None:
    assert ray_address(Settings(ray_address=None)) == "local"  # never /tmp/ray/ray_current_cluster
    with socket.create_server(("127.0.0.1", 0)) as listening:
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        assert ray_address(Settings(ray_address=address)) == address


def test_a_dead_address_is_refused_in_one_line() -> None:
    port = free_port()
    with pytest.raises(ClusterError, match=rf"^Ray at 127\.0\.0\.1:{port}: nothing answers .*RAY_ADDRESS"):
        ray_address(Settings(ray_address=f"127.0.0.1:{port}"))
    with pytest.raises(ClusterError, match="not host:port"):
        ray_address(Settings(ray_address="127.0.0.1:http"))


def test_train_on_a_dead_ray_address_ends_at_once_with_exit_6(tmp_path: Path) -> None:
    spec = spec_file(tmp_path, "dead")
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(CLI), "train", str(spec)], env=env, capture_output=True, text=True, timeout=300
    )
    took = time.monotonic() - t0
    assert proc.returncode == ClusterError.exit_code == 6, proc.stderr[-2000:]
    assert (
        proc.stderr.strip().splitlines()[-1].startswith(f"alexnet-dist: error: Ray at {env['RAY_ADDRESS']}")
    )
    assert "Traceback" not in proc.stderr
    print(f"\ntrain on a dead RAY_ADDRESS: exit 6 after {took:.1f} s")
