"""bench/gpu_check.py as a CPU dry run: every part runs, writes its JSON with sane figures, and passes.

The run is a subprocess with Ray, Redis, boto3 and webdataset made unimportable (the lent GPU machine has
none of them), so it also proves the check's path needs none of them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("numerics", "step", "profile", "loader", "loop")
BLOCKER = """
import importlib.abc, sys

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"ray", "redis", "boto3", "botocore", "webdataset"}:
            raise ImportError(f"{name}: not on the GPU box (blocked by the test)")
        return None

sys.meta_path.insert(0, _Blocked())
"""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("gpu-check")
    (tmp / "block").mkdir()
    (tmp / "block" / "sitecustomize.py").write_text(BLOCKER)  # imported at start-up, child processes too
    path = os.pathsep.join(p for p in (str(tmp / "block"), os.environ.get("PYTHONPATH")) if p)
    out = tmp / "out"
    command = [
        sys.executable,
        str(ROOT / "bench" / "gpu_check.py"),
        str(out),
        "--dry-run",
        "--work-dir",
        str(tmp),
    ]
    proc = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "[gpu-check" in proc.stdout and "done in" in proc.stdout  # progress lines
    return {name: json.loads((out / f"{name}.json").read_text()) for name in (*PARTS, "summary")}


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_every_part_passes_on_the_cpu_and_says_so(dry_run) -> None:
    for name in PARTS:
        doc = dry_run[name]
        assert doc["part"] == name and doc["passed"] is True, doc.get("error")
        assert doc["device"] == "cpu" and doc["dry_run"] is True and positive(doc["seconds"])
    s = dry_run["summary"]
    assert s["passed"] is True and s["device"] == "cpu" and s["dry_run"] is True and "no figure" in s["note"]
    assert set(s["parts"]) == set(PARTS) and all(
        p["passed"] and p["error"] is None for p in s["parts"].values()
    )
    # no performance target applies to a CPU dry run; the measured values are still there
    t = s["targets"]
    assert t["applies"] is False and all(t[k]["met"] is None for k in ("step_vs_torchvision", "loop_vs_step"))
    ratios = {str(r["batch"]): r["ratio_vs_torchvision"] for r in dry_run["step"]["rows"]}
    assert t["step_vs_torchvision"]["measured"] == ratios
    assert s["targets_missed"] == []
    used = {d.lower().replace("_", "-") for d in s["imported_distributions"]}
    assert {"torch", "torchvision", "pydantic", "pydantic-core", "numpy", "pillow"} <= used
    assert not used & {"ray", "redis", "boto3", "botocore", "webdataset"}


@pytest.mark.slow
def test_numerics_within_tolerance(dry_run) -> None:
    cases = dry_run["numerics"]["cases"]
    assert set(cases) == {"fp32", "bf16_channels_last", "fp32_crossing"}
    for name, c in cases.items():
        tol = c["tolerance"]
        assert c["passed"] and c["missing_grads"] == [], name
        assert (
            0 < c["output_rel_error"] <= tol["output"]
            and 0 < c["grad_rel_error_global"] <= tol["grad_global"]
        )
        assert c["grad_rel_error_global"] <= c["grad_rel_error_worst"] <= tol["grad_worst"]
    # float32 on the CPU lands far under its tolerance (float64 reference); bf16 far above float32
    assert cases["fp32"]["output_rel_error"] < 1e-5 and cases["fp32"]["grad_rel_error_worst"] < 1e-5
    assert cases["bf16_channels_last"]["output_rel_error"] > 10 * cases["fp32"]["output_rel_error"]
    assert cases["bf16_channels_last"]["bf16"] and cases["bf16_channels_last"]["channels_last"]


@pytest.mark.slow
def test_step_rates_ratios_and_flops(dry_run) -> None:
    step = dry_run["step"]
    # forward MACs from the layer shapes: 0.724 G for the paper's network at 227 px (the two towers add up
    # to the grouped network), 0.714 G for torchvision's at 224 px
    assert step["forward_macs_per_image"] == {"ours": 724_406_816, "torchvision": 714_188_480}
    assert step["train_flops_per_image"] == {k: 6 * v for k, v in step["forward_macs_per_image"].items()}
    assert [r["batch"] for r in step["rows"]] == [2, 4] and step["precision"] == "fp32"
    for r in step["rows"]:
        ips = r["images_per_s"]
        assert positive(ips["ours"]) and positive(ips["torchvision"])
        assert r["ratio_vs_torchvision"] == pytest.approx(ips["ours"] / ips["torchvision"])
        assert r["tflops"]["ours"] == pytest.approx(
            step["train_flops_per_image"]["ours"] * ips["ours"] / 1e12
        )
        assert r["step_ms"]["ours"] == pytest.approx(1000 * r["batch"] / ips["ours"])


@pytest.mark.slow
def test_profile_top_ops_and_lrn_share(dry_run) -> None:
    p = dry_run["profile"]
    assert len(p["top"]) > 5 and all(0 < r["share"] <= 1 and r["ms_per_step"] > 0 for r in p["top"])
    shares = [r["share"] for r in p["top"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-9
    assert positive(p["lrn_profiled_ms_per_step"]["forward"]) and positive(
        p["lrn_profiled_ms_per_step"]["backward"]
    )
    assert 0 < p["lrn_share_of_profiled_time"] < 0.5
    assert p["lrn_share_by_ablation"] == pytest.approx(1 - p["step_ms_without_lrn"] / p["step_ms"])
    assert math.isfinite(p["lrn_share_by_ablation"])  # a difference of two timings: noise on a shared CPU


@pytest.mark.slow
def test_loader_rates_on_written_shards(dry_run) -> None:
    d = dry_run["loader"]
    sh = d["shards"]
    assert (sh["train_images"], sh["val_images"], sh["classes"], sh["image_size"]) == (64, 16, 4, 256)
    assert 10 < sh["mean_jpeg_kb"] < 60  # 256 px JPEGs at quality 90 with photo-like entropy
    # the CPU decoder in the workers, and the device decoder (the JPEGs decoded where the model trains)
    rows = [(r["decoder"], r["workers"]) for r in d["rows"]]
    assert rows == [("crop", 1), ("crop", 2), ("device", 1), ("device", 2)]
    assert all(r["images_on"] == "cpu" for r in d["rows"])
    for r in d["rows"]:
        assert r["images"] == r["batches"] * d["batch"] == 64
        assert positive(r["images_per_s"]) and positive(r["images_per_s_after_first_batch"])
        assert r["vs_step"] == pytest.approx(
            r["images_per_s_after_first_batch"] / d["step_reference"]["images_per_s"]
        )
    assert d["step_reference"]["batch"] == 4  # part b's rate at the loader's batch


@pytest.mark.slow
def test_loop_resumes_where_it_was_killed(dry_run) -> None:
    d = dry_run["loop"]
    assert all(d["checks"].values()), d["checks"]
    steps, every = d["steps_per_epoch"], d["checkpoint_every_steps"]
    assert (steps, every) == (8, 4) and d["killed_at_global_step"] == steps + every + 1
    assert d["child_returncode"] != 0 and d["newest_checkpoint_after_kill"].startswith(
        f"checkpoint_{steps + every:010d}_"
    )
    ev = d["resumed_event"]
    assert (ev["epoch"], ev["step"], ev["global_step"]) == (1, every, steps + every)
    assert d["resumed"]["steps"] == d["uninterrupted"]["steps"] == 2 * steps
    assert d["resumed"]["ten_crop"] and d["resumed"]["val_samples"] == 16
    # the CPU repeats itself: the resumed run ends with the uninterrupted run's weights, bit for bit
    assert d["mode"] == "exact" and d["exact_error"] is None
    assert d["weights"] == {"bit_exact": True, "diff_vs_update_after_resume": 0.0, "max_abs_diff": 0.0}
    # the same epochs and validation errors. Not the same train_loss (nor images/s) for the epoch the run
    # resumed in: the loop's epoch mean covers only the steps after the resume (the sum before it is not
    # in the checkpoint).
    keep = ("epoch", "lr", "val_top1_error", "val_top5_error", "val_samples")
    assert [{k: h[k] for k in keep} for h in d["resumed"]["history"]] == [
        {k: h[k] for k in keep} for h in d["uninterrupted"]["history"]
    ]
    assert d["resumed"]["history"][0]["train_loss"] == d["uninterrupted"]["history"][0]["train_loss"]
    e2e = d["end_to_end"]
    assert positive(e2e["images_per_s_steady"]) and positive(e2e["bare_step_images_per_s"])
    assert len(e2e["images_per_s_epochs"]) == 2 and all(positive(x) for x in e2e["images_per_s_epochs"])
    assert e2e["vs_bare_step_steady"] == pytest.approx(
        e2e["images_per_s_steady"] / e2e["bare_step_images_per_s"]
    )
    dev = d["end_to_end_device_decoder"]
    assert dev["run"] == "speed-device" and positive(dev["images_per_s_steady"])
    assert dev["vs_bare_step_steady"] == pytest.approx(
        dev["images_per_s_steady"] / e2e["bare_step_images_per_s"]
    )
    target = dry_run["summary"]["targets"]["loop_vs_step"]
    assert target["by_decoder"] == {"crop": e2e["vs_bare_step_steady"], "device": dev["vs_bare_step_steady"]}
    assert target["measured"] == max(target["by_decoder"].values())


def test_gpu_wheels_lists_pydantic_and_what_it_needs() -> None:
    """bench/gpu_wheels.sh pins the wheels a bare GPU box lacks to this venv's versions (no download here)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_wheels.sh"), "--list"],
        env={**os.environ, "PY": sys.executable}, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    pins = dict(line.split("==") for line in proc.stdout.split())
    assert pins == {
        name: metadata.version(name)
        for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
    }
