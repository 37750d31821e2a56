"""Data pipeline benchmark: prints JSON with images/s and ratios.

Same 256x256 JPEG files (Fashion-MNIST upscaled, RGB, quality 90) three ways, same transforms (random
227 crop + flip) and the same number of loader workers:

- ``shards``: our ShardLoader over tar shards holding the very same JPEG bytes (local disk), as it runs by
  default (decoder ``crop``): each view's crop decoded straight into its batch slot (``jpeg_kernel``);
  ``shards_whole_decode``: the same with decoder ``whole``: whole-image decodes (torchvision) and a
  crop/flip copy;
- ``imagefolder``: torchvision ``ImageFolder`` + ``DataLoader`` over the files (PIL decode);
- ``ceiling``: a bare decode loop over the JPEG bytes already in memory, in as many processes;
- ``shards_s3``: our loader reading the shards from a local S3 server (moto, over HTTP);
- ``shards_s3_latency``: the same through a proxy that holds every GET ``--latency-ms`` before its first
  byte (a distant S3 endpoint), over smaller shards (``--latency-shard-size``): read-ahead on (the
  loader's default depth) against off (one streaming GET a shard, each waiting its latency in turn);
  ``s3_latency_read_ahead_vs_off`` is the median over rounds of their whole-epoch rates' ratio (each
  GET's wait, the first one's too, is what read-ahead hides; a few thousand images are too few for the
  steady rate to show it, as the workers' prefetched batches pile up behind the first),
  ``s3_latency.overlap`` the most GETs the proxy held at once with read-ahead on.

Also single-process decode cost per image: PIL, PIL with ``draft``, ``torchvision.io.decode_jpeg`` (the
ceiling's) and our crop-only decode (a mirrored 227 crop).
Targets: shards >= 1.0x imagefolder, >= 0.85x ceiling, S3 >= 0.9x local.

The loaders' rates are steady-state: counted from their first batch to their last, as the ceiling's in warm
processes (an ImageNet epoch is 1.28M images; starting and stopping the workers is noise there, not in a
run of a few thousand). The whole-epoch rates, start and shutdown included, are in ``epoch_images_per_s``.
Every side is measured ``--repeat`` times, in rounds (one run of each side per round, so drifts of the
machine hit all sides alike), and the median run is reported: one run varies noticeably from the next.
``cpu_us_per_image`` is the CPU time (all processes of each side) per image: what the ratios are made of
when the workers keep the cores busy, and steadier than rates when other work shares the machine.

    .venv/bin/python bench/data.py [--images 4000] [--workers 2] [--batch 64] [--repeat 3]
        [--only shards,shards_s3_latency] [--latency-ms 50] [--latency-shard-size 100]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alexnet_dist import storage
from alexnet_dist.data import augment
from alexnet_dist.data.build import fashion_mnist
from alexnet_dist.data.build import writer as shard_writer
from alexnet_dist.data.loader import LoaderConfig, make_loader
from alexnet_dist.data.manifest import Manifest, ShardInfo
from alexnet_dist.kernels import jpeg as jpeg_kernel

FASHION = Path("/usr/share/datasets/fashion-mnist")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' TCP proxies
from proxies import LatencyProxy  # noqa: E402


def make_jpegs(n: int, size: int) -> list[tuple[int, bytes]]:
    images, labels = fashion_mnist.load_split(FASHION, "train")
    out = []
    for i in range(n):
        img = Image.fromarray(images[i]).resize((size, size), Image.BILINEAR).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append((int(labels[i]), buf.getvalue()))
    return out


def write_imagefolder(root: Path, jpegs: list[tuple[int, bytes]]) -> None:
    for i, (label, data) in enumerate(jpegs):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        (root / f"c{label}" / f"{i:06d}.jpg").write_bytes(data)


def write_shards(out: Path, jpegs: list[tuple[int, bytes]], per_shard: int, size: int) -> Manifest:
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(jpegs), per_shard)):
        path = out / f"bench-{s:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + per_shard, len(jpegs))):
                label, data = jpegs[i]
                for name, blob in shard_writer.sample_members(f"s{i:06d}", label, data, {"i": i}):
                    shard_writer.add_member(tar, name, blob)
        blob = path.read_bytes()
        count = min(per_shard, len(jpegs) - start)
        shards.append(ShardInfo(str(path), count, len(blob), hashlib.sha256(blob).hexdigest()))
    return Manifest(
        url=str(out / "bench.json"), split="train", shards=tuple(shards), classes=tuple(map(str, range(10))),
        names=fashion_mnist.CLASSES, image_size=size, mean=(73.0,) * 3, std=(86.0,) * 3,
        eigval=(22000.0, 1.0, 1.0), num_samples=len(jpegs),
        eigvec=((0.577, 0.577, 0.577), (-0.707, 0.0, 0.707), (0.408, -0.816, 0.408)),
    )  # fmt: skip


def _cpu_s() -> float:
    """CPU seconds of this process and its reaped children (loader and pool workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Rate:
    steady: float  # images/s from the first batch on
    epoch: float  # images/s of the whole epoch, worker start included
    cpu_us: float  # CPU us per image, every process of the side


def time_batches(batches) -> Rate:
    cpu0, start = _cpu_s(), time.perf_counter()
    first, last, n, n_first = None, None, 0, 0
    for size in batches:
        n += size
        last = time.perf_counter()
        if first is None:
            first, n_first = last, n
    end = time.perf_counter()  # after the loader shut its workers down
    del batches  # joins the loader's workers, so their CPU time is counted
    steady = (n - n_first) / (last - first) if first is not None and n > n_first else 0.0
    return Rate(steady, n / (end - start), (_cpu_s() - cpu0) / max(n, 1) * 1e6)


def rate_shards(
    m: Manifest, args, endpoint_url: str | None = None, *, decoder: str | None = None, **cfg_fields
) -> Rate:
    """Our loader over the shards with this decoder (a name in ``DECODERS``; None: the default, ``crop``)
    and any other LoaderConfig fields given."""
    cfg = LoaderConfig(batch_size=args.batch, crop=args.crop, mode="train", seed=0, num_workers=args.workers)
    if decoder is not None:
        cfg = replace(cfg, decoder=decoder)
    cfg = replace(cfg, **cfg_fields)
    loader = make_loader(m, cfg, rank=0, world_size=1, endpoint_url=endpoint_url)
    return time_batches(batch.images.shape[0] for batch in loader)


def rate_imagefolder(root: Path, args) -> Rate:
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [transforms.RandomCrop(args.crop), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root), transform=tf), batch_size=args.batch, shuffle=True,
        num_workers=args.workers, drop_last=True,
    )  # fmt: skip
    return time_batches(images.shape[0] for images, _ in loader)


_BLOBS: list[bytes] = []


def _decode_range(bounds: tuple[int, int]) -> int:
    torch.set_num_threads(1)
    for data in _BLOBS[bounds[0] : bounds[1]]:
        augment.decode_image(data)
    return bounds[1] - bounds[0]


def rate_ceiling(jpegs: list[tuple[int, bytes]], workers: int) -> Rate:
    """The same JPEG bytes, decoded by the pipeline's decode function in ``workers`` warm processes."""
    _BLOBS[:] = [bytearray(d) for _, d in jpegs]  # as the loader reads them from a shard: no copy
    n, w = len(_BLOBS), max(1, workers)
    parts = [(i * n // w, (i + 1) * n // w) for i in range(w)]
    pool = multiprocessing.get_context("fork").Pool(w)
    pool.map(_decode_range, [(0, 8)] * w)  # warm the workers
    cpu0, start = _cpu_s(), time.perf_counter()
    done = sum(pool.map(_decode_range, parts))
    rate = done / (time.perf_counter() - start)
    pool.close()
    pool.join()  # reaped: their CPU time is counted (the 8-image warm-up too, a small share of it)
    return Rate(rate, rate, (_cpu_s() - cpu0) / done * 1e6)


def decode_costs(jpegs: list[tuple[int, bytes]], crop: int) -> dict[str, float]:
    blobs = [d for _, d in jpegs[:300]]

    def per_image(fn) -> float:
        start = time.perf_counter()
        for b in blobs:
            fn(b)
        return (time.perf_counter() - start) / len(blobs) * 1e6

    def pil(b: bytes) -> None:
        Image.open(io.BytesIO(b)).convert("RGB").load()

    def pil_draft(b: bytes) -> None:
        img = Image.open(io.BytesIO(b))
        img.draft("RGB", (crop, crop))  # only helps when the image is >= 2x the request
        img.convert("RGB").load()

    view = torch.empty(crop, crop, 3, dtype=torch.uint8)
    costs = {
        "pil_us": round(per_image(pil), 1),
        "pil_draft_us": round(per_image(pil_draft), 1),
        "torchvision_decode_us": round(per_image(augment.decode_image), 1),
    }
    if jpeg_kernel.available():  # the loader's path: only the crop's rows and columns, mirrored
        costs["crop_decode_us"] = round(
            per_image(lambda b: jpeg_kernel.decode_crop_into(view, b, 14, 15, True)), 1
        )
    return costs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a running process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def copy_to_s3(m: Manifest, endpoint: str, bucket: str) -> Manifest:
    """The manifest's local shards uploaded to ``bucket``; the manifest of the copies."""
    storage.s3_client(endpoint).create_bucket(Bucket=bucket)
    shards = []
    for s in m.shards:
        url = f"s3://{bucket}/{Path(s.url).name}"
        storage.write_bytes(url, Path(s.url).read_bytes(), endpoint_url=endpoint)
        shards.append(ShardInfo(url, s.count, s.bytes, s.sha256))
    return replace(m, shards=tuple(shards))


@contextlib.contextmanager
def moto_server():
    """A local S3 server (moto, over HTTP): (its endpoint, its pid)."""
    port = free_port()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(
        {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    )
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def rate_s3(m3: Manifest, endpoint: str, moto_pid: int, args) -> tuple[Rate, float]:
    """Our loader reading the shards from moto; and moto's CPU us per image meanwhile."""
    moto_cpu = _proc_cpu_s(moto_pid)
    rate = rate_shards(m3, args, endpoint)
    return rate, (_proc_cpu_s(moto_pid) - moto_cpu) / m3.num_samples * 1e6


def rate_s3_latency(m3: Manifest, proxy: LatencyProxy, args, read_ahead: bool) -> Rate:
    """Our loader reading the shards through the latency proxy, read-ahead on (the default) or off."""
    proxy.reset()
    extra = {} if read_ahead else {"read_ahead": 0}
    return rate_shards(m3, args, proxy.endpoint_url, **extra)


def median_rate(rates: list[Rate]) -> Rate:
    """The run with the median steady rate (runs vary from one to the next)."""
    return sorted(rates, key=lambda r: r.steady)[len(rates) // 2]


SIDES = ("shards", "shards_whole_decode", "imagefolder", "ceiling", "shards_s3", "shards_s3_latency")


def _ratio(figures: dict[str, float], a: str, b: str) -> float | None:
    """figures[a] / figures[b], rounded; None when a side was not measured."""
    return round(figures[a] / figures[b], 3) if a in figures and b in figures and figures[b] else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--crop", type=int, default=227)
    parser.add_argument("--size", type=int, default=256)
    # 1,000 images: still small beside the 100 MB-1 GB shards webdataset advises; each S3 GET costs moto
    # CPU time of its own, so tiny shards measure the GET, not the stream
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every measurement; medians shown")
    parser.add_argument("--only", default=",".join(SIDES), help="comma-separated sides to measure")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="wait of every GET, shards_s3_latency")
    # smaller shards, so that an epoch of a few thousand images meets as many shard boundaries (GETs)
    # as the bench can show: with 1,000-image shards a stream waits for a GET only twice
    parser.add_argument("--latency-shard-size", type=int, default=100)
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(SIDES):
        parser.error(f"--only: unknown sides {sorted(only - set(SIDES))}; use some of {', '.join(SIDES)}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        jpegs = make_jpegs(args.images, args.size)
        write_imagefolder(tmp / "folder", jpegs)
        m = write_shards(tmp / "shards", jpegs, args.shard_size, args.size)
        small = write_shards(tmp / "small", jpegs, args.latency_shard_size, args.size)
        with moto_server() as (endpoint, moto_pid):
            m3 = copy_to_s3(m, endpoint, "bench") if "shards_s3" in only else None
            small3 = copy_to_s3(small, endpoint, "bench-small") if "shards_s3_latency" in only else None
            proxy = LatencyProxy(endpoint, delay=args.latency_ms / 1000)
            rate_shards(m, args)  # warm the page cache and imports
            runs: dict[str, list[Rate]] = {}
            moto_us: list[float] = []
            overlap: list[int] = []
            for _ in range(args.repeat):  # each round measures every side: drifts hit them all alike
                for name, measure in (
                    ("shards", lambda: rate_shards(m, args)),
                    ("shards_whole_decode", lambda: rate_shards(m, args, decoder="whole")),
                    ("imagefolder", lambda: rate_imagefolder(tmp / "folder", args)),
                    ("ceiling", lambda: rate_ceiling(jpegs, args.workers)),
                ):
                    if name in only:
                        runs.setdefault(name, []).append(measure())
                if m3 is not None:
                    rate, us = rate_s3(m3, endpoint, moto_pid, args)
                    runs.setdefault("shards_s3", []).append(rate)
                    moto_us.append(us)
                if small3 is not None:
                    runs.setdefault("shards_s3_latency", []).append(
                        rate_s3_latency(small3, proxy, args, True)
                    )
                    overlap.append(proxy.max_waiting)
                    off = rate_s3_latency(small3, proxy, args, False)
                    runs.setdefault("shards_s3_latency_off", []).append(off)
            proxy.close()
        rates = {k: median_rate(v) for k, v in runs.items()}
        moto_cpu = round(float(np.median(moto_us)), 1) if moto_us else None
        figures = {k: r.steady for k, r in rates.items()}
        epoch_runs = {k: v for k, v in runs.items() if k != "ceiling"}
        # read-ahead on vs off, paired by round (they ran one after the other: a drift hits both alike)
        on, off = runs.get("shards_s3_latency", []), runs.get("shards_s3_latency_off", [])
        latency_ratio = (
            round(float(np.median([a.epoch / b.epoch for a, b in zip(on, off, strict=True)])), 3)
            if on
            else None
        )
        cpu = {k: r.cpu_us for k, r in rates.items()}
        cpu_inv = {k: 1 / v for k, v in cpu.items()}  # images per CPU us: ratios of efficiency
        if "shards_s3" in cpu:
            cpu_inv["shards_s3_with_moto"] = 1 / (cpu["shards_s3"] + float(np.median(moto_us)))
        report = {
            "images": args.images, "workers": args.workers, "batch": args.batch, "crop": args.crop,
            "jpeg_bytes_mean": int(np.mean([len(d) for _, d in jpegs])),
            "repeat": args.repeat,
            "images_per_s": {k: round(v, 1) for k, v in figures.items()},
            "images_per_s_runs": {k: [round(r.steady) for r in v] for k, v in runs.items()},
            "epoch_images_per_s": {k: round(r.epoch, 1) for k, r in rates.items() if k != "ceiling"},
            "epoch_images_per_s_runs": {k: [round(r.epoch) for r in v] for k, v in epoch_runs.items()},
            "cpu_us_per_image": {**{k: round(v, 1) for k, v in cpu.items()}, "moto": moto_cpu},
            # per-image CPU efficiency (S3: moto's CPU counted): what the rate ratios come to on an idle
            # machine, and steadier than they are when other work shares the cores
            "cpu_ratios": {
                "shards_vs_ceiling": _ratio(cpu_inv, "shards", "ceiling"),
                "shards_whole_decode_vs_ceiling": _ratio(cpu_inv, "shards_whole_decode", "ceiling"),
                "s3_vs_local": _ratio(cpu_inv, "shards_s3_with_moto", "shards"),
            },
            "ratios": {
                "shards_vs_imagefolder": _ratio(figures, "shards", "imagefolder"),
                "shards_vs_ceiling": _ratio(figures, "shards", "ceiling"),
                "shards_whole_decode_vs_ceiling": _ratio(figures, "shards_whole_decode", "ceiling"),
                "s3_vs_local": _ratio(figures, "shards_s3", "shards"),
                "s3_latency_read_ahead_vs_off": latency_ratio,
            },
            "targets": {"shards_vs_imagefolder": 1.0, "shards_vs_ceiling": 0.85, "s3_vs_local": 0.9},
            "s3_latency": {"ms_per_get": args.latency_ms, "shard_size": args.latency_shard_size,
                           "read_ahead": LoaderConfig(1, 1, "train", 0).read_ahead,
                           "overlap": max(overlap) if overlap else None},
            "decode_single_process": decode_costs(jpegs, args.crop),
            "cpus": os.cpu_count(),
        }  # fmt: skip
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
