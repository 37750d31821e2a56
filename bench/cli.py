"""How fast the CLI answers: wall time of `alexnet-dist status JOB` (and `list`, `submit`) as a user runs
it, a fresh process each time, against `redis-cli HGETALL` of the same job in the same run (the floor: a
process that reads one Redis hash), and `alexnet-dist --version` (Python and the CLI's imports alone).

    .venv/bin/python bench/cli.py [--runs 15]

It starts its own redis-server on a free port, submits one job, and prints one JSON object: per command
the median and min/max of ``--runs`` runs, and the ratio to redis-cli.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from alexnet_dist.data.manifest import Manifest, save_manifest

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(cmd: list[str], env: dict[str, str], runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    redis_server, redis_cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not (redis_server and redis_cli):
        raise SystemExit("redis-server and redis-cli are needed: run `make setup`")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                if subprocess.run([redis_cli, "-p", str(port), "ping"], capture_output=True).returncode == 0:
                    break
                time.sleep(0.05)
            spec = Path(tmp) / "job.toml"
            manifests = {}
            for split in ("train", "val"):  # a manifest of 10 classes and no shards: submit only checks it
                path = str(Path(tmp) / f"{split}.json")
                save_manifest(
                    Manifest(
                        url=path,
                        split=split,
                        shards=(),
                        classes=tuple(map(str, range(10))),
                        names=tuple(f"c{i}" for i in range(10)),
                        image_size=32,
                        mean=(1.0, 1.0, 1.0),
                        std=(1.0, 1.0, 1.0),
                        eigval=(3.0, 2.0, 1.0),
                        eigvec=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
                        num_samples=0,
                    ),
                    path,
                )
                manifests[split] = path
            spec.write_text(
                f'name = "bench"\n[data]\ntrain = "{manifests["train"]}"\nval = "{manifests["val"]}"\n'
                '[model]\nnum_classes = 10\n[scaling]\nworkers = 1\ndevices = "cpu"\n'
            )
            env = {**os.environ, "ALEXNET_DIST_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
            env.pop("ALEXNET_DIST_SERVER", None)
            cli = str(BIN / "alexnet-dist")
            out = subprocess.run(
                [cli, "submit", str(spec), "--json"], env=env, capture_output=True, text=True
            )
            if out.returncode != 0:
                raise SystemExit(f"submit failed: {out.stderr}")
            job = json.loads(out.stdout)["id"]
            baseline = _time([redis_cli, "-p", str(port), "HGETALL", f"alexnet:job:{job}"], env, args.runs)
            figures = {
                "status": _time([cli, "status", job], env, args.runs),
                "status_json": _time([cli, "status", job, "--json"], env, args.runs),
                "list": _time([cli, "list"], env, args.runs),
                "submit": _time([cli, "submit", str(spec)], env, args.runs),
                "version": _time([cli, "--version"], env, args.runs),
            }
        finally:
            server.terminate()
            server.wait(10)
    print(
        json.dumps(
            {
                "bench": "cli",
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                "runs": args.runs,
                "baseline": {"redis-cli HGETALL": baseline},
                "figures": figures,
                "ratio_to_redis_cli": {k: v["median_s"] / baseline["median_s"] for k, v in figures.items()},
                "target": "status under 0.5 s",
                "status_under_target": figures["status"]["median_s"] < 0.5,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
