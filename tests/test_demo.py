"""The main job end to end: `scripts/demo.sh` (what `make demo` runs), shortened to one epoch.

Real redis-server, a real Ray head, the dispatcher, two Ray Train workers, all 70,000 Fashion-MNIST
images as shards; the result is read back through Redis by `alexnet-dist result`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_one_epoch_demo_through_the_whole_service(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "EPOCHS": "1",
        "COLUMNS": "250",  # rich would shorten the image paths in the table to the terminal width
        "DEMO_DIR": str(tmp_path / "demo"),
        "STACK": str(tmp_path / "stack"),
        "SHARDS": str(tmp_path / "shards"),
        **{
            k: str(free_port())
            for k in ("REDIS_PORT", "DASHBOARD_PORT", "CLIENT_PORT", "AGENT_PORT", "API_PORT")
        },
        "RAY_PORT": str(free_port()),
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    result = json.loads((tmp_path / "demo" / "result.json").read_text())
    res = result.get("result", result)
    # the job's final ten-crop evaluation on all 10,000 test images, one epoch of 60,000
    assert res["ten_crop"] is True and res["val_samples"] == 10_000
    assert res["top1_error"] < 0.3, res  # chance is 0.9
    assert res["top5_error"] < res["top1_error"]
    assert f"top-1 error {res['top1_error']:.4f}" in out  # printed from what `result` read out of Redis
    assert Path(res["model_url"].removeprefix("file://")).exists()
    # eight test images classified, each with its top-5 and probabilities
    classified = re.findall(r"test0\d-[a-z-]+\.(?:png|jpg)", out)
    assert len(set(classified)) == 8, out[-3000:]
    curves = tmp_path / "demo" / "curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "stopped redis-server, the Ray head, the API server and the dispatcher" in out
    # the user's commands went through the API server with the token the demo made (mode 0600)
    assert "== 6. result (through the API server)" in out
    token_file = tmp_path / "stack" / "demo-token"
    assert re.search(r"│ user\s+│ demo\s+│", out), out[-3000:]  # the owner came from the token
    assert token_file.read_text().startswith("adt_") and token_file.stat().st_mode & 0o077 == 0
