"""Importing a bvlc_alexnet-sized ``.caffemodel``: the hand decoder against the protobuf library's parser.

The file is synthetic, shaped like bvlc_alexnet (233 MiB: conv1-conv5 and fc6-fc8 with their real weight
and bias shapes, random values, AlexNet's layers between them) in three encodings:

- ``layers-V1-packed``: V1 ``layers`` with enum types, legacy 4-D num/channels/height/width blobs and
  packed floats, how bvlc_alexnet.caffemodel itself is written;
- ``layer-V2-packed``: ``layer`` with string types, ``shape`` blobs, packed floats;
- ``layers-V1-unpacked``: as the first, but every float its own fixed32 field (older Caffe; 291 MiB).

The two readers:

- ``hand``: the package's :func:`alexnet_dist.interop.caffe.load_caffemodel` as it is, on
  :mod:`alexnet_dist.interop.protowire` (zero-copy numpy views of the file's bytes);
- ``protobuf``: the same ``load_caffemodel`` with its ``read_caffemodel`` replaced by one on the protobuf
  runtime: the whole NetParameter parsed by the library against Caffe's field numbers (a schema built
  below as a FileDescriptorProto, so no protoc is needed), each blob's floats taken out with ``np.array``
  (the runtime's ``__array__``, one copy). The small parameter messages (convolution, pooling, ...) are
  declared ``bytes`` and handed on as :class:`~alexnet_dist.interop.protowire.Msg`, so that everything
  after the parse is the package's own code; they are a few hundred bytes of the file. The weights are
  copied into the model the same way for both, once more than a reader built on the library alone would
  need (the hand decoder's views are read-only); ``read_caffemodel_cpu_median_s`` compares the decoding
  itself like for like.

Each run is ``load_caffemodel`` end to end (parse, checks, the model built, weights copied) to the
model's ``state_dict``, in a fresh process (nothing cached between runs), in rounds that alternate the
readers so a drift of the machine hits both alike; both must give bit-identical state dicts. Reported per
reader: the median wall seconds of ``--repeat`` runs and their spread, the CPU seconds (steadier on a
shared machine), the part spent in ``read_caffemodel``, and peak resident memory before and after the
import. ``figure`` is the protobuf reader on bvlc_alexnet's own encoding, ``baseline`` the hand decoder
on it, ``ratio`` their quotient (above 1: the protobuf reader is slower).

    .venv/bin/python bench/caffe_import.py [--repeat 5] [--encodings layers-V1-packed,layer-V2-packed]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ENCODINGS = ("layers-V1-packed", "layer-V2-packed", "layers-V1-unpacked")

# --------------------------------------------------------------------------------------------------
# A bvlc_alexnet-shaped file, written with a small protobuf encoder of its own

SHAPES = {
    "conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
    "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3), "fc6": (4096, 9216), "fc7": (4096, 4096),
    "fc8": (1000, 4096),
}  # fmt: skip
# (kernel, stride, pad, group) of each convolution.
CONV = {"conv1": (11, 4, 0, 1), "conv2": (5, 1, 2, 2), "conv3": (3, 1, 1, 1), "conv4": (3, 1, 1, 2),
        "conv5": (3, 1, 1, 2)}  # fmt: skip
V1_TYPES = {"Data": 5, "Convolution": 4, "ReLU": 18, "LRN": 15, "Pooling": 17, "InnerProduct": 14,
            "Dropout": 6, "SoftmaxWithLoss": 21}  # fmt: skip
# Field numbers in (LayerParameter, V1LayerParameter).
FIELDS = {"name": (1, 4), "type": (2, 5), "bottom": (3, 2), "top": (4, 3), "blobs": (7, 6),
          "convolution": (106, 10), "inner_product": (117, 17), "lrn": (118, 18), "pooling": (121, 19),
          "dropout": (108, 12), "transform": (100, 36)}  # fmt: skip


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _float(num: int, value: float) -> bytes:
    return _varint(num << 3 | 5) + struct.pack("<f", value)


def _len(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _blob(array: np.ndarray, encoding: str) -> bytes:
    array = np.ascontiguousarray(array, "<f4")
    if encoding == "layer-V2-packed":
        return _len(7, _len(1, b"".join(_varint(d) for d in array.shape))) + _len(5, array.tobytes())
    dims = (1,) * (4 - array.ndim) + array.shape
    head = b"".join(_int(n, d) for n, d in zip((1, 2, 3, 4), dims, strict=True))
    if encoding == "layers-V1-packed":
        return head + _len(5, array.tobytes())
    records = np.empty(array.size, np.dtype([("tag", "u1"), ("value", "<f4")]))
    records["tag"], records["value"] = 5 << 3 | 5, array.ravel()
    return head + records.tobytes()


def _layers() -> list[dict[str, Any]]:
    """bvlc_alexnet's train_val net: names, types, wiring and parameters."""
    lrn, pool = _int(1, 5) + _float(2, 1e-4) + _float(3, 0.75), _int(2, 3) + _int(3, 2)
    transform = _int(2, 1) + _int(3, 227) + _len(4, b"data/ilsvrc12/imagenet_mean.binaryproto")
    out: list[dict[str, Any]] = [
        {"name": "data", "type": "Data", "top": ["data", "label"], "transform": transform}
    ]
    below = "data"
    for i, (name, (kernel, stride, pad, group)) in enumerate(CONV.items(), 1):
        conv = _int(1, SHAPES[name][0]) + _int(3, pad) + _int(4, kernel) + _int(6, stride) + _int(5, group)
        out.append(
            {"name": name, "type": "Convolution", "bottom": [below], "top": [name], "convolution": conv}
        )
        out.append({"name": f"relu{i}", "type": "ReLU", "bottom": [name], "top": [name]})
        below = name
        for prefix, kind, key, param in [("norm", "LRN", "lrn", lrn), ("pool", "Pooling", "pooling", pool)]:
            if i in (1, 2) or (i == 5 and kind == "Pooling"):
                out.append({"name": f"{prefix}{i}", "type": kind, "bottom": [below], "top": [f"{prefix}{i}"],
                            key: param})  # fmt: skip
                below = f"{prefix}{i}"
    for name in ("fc6", "fc7", "fc8"):
        out.append({"name": name, "type": "InnerProduct", "bottom": [below], "top": [name],
                    "inner_product": _int(1, SHAPES[name][0])})  # fmt: skip
        below = name
        if name != "fc8":
            out.append({"name": f"relu{name[2]}", "type": "ReLU", "bottom": [name], "top": [name]})
            out.append({"name": f"drop{name[2]}", "type": "Dropout", "bottom": [name], "top": [name],
                        "dropout": _float(1, 0.5)})  # fmt: skip
    out.append({"name": "loss", "type": "SoftmaxWithLoss", "bottom": ["fc8", "label"], "top": ["loss"]})
    return out


def write_caffemodel(path: Path, encoding: str, seed: int = 0) -> Path:
    """The synthetic bvlc_alexnet in ``encoding``, written one layer at a time."""
    rng, v1 = np.random.default_rng(seed), encoding != "layer-V2-packed"
    col = 1 if v1 else 0
    with path.open("wb") as out:
        out.write(_len(1, b"AlexNet"))
        for layer in _layers():
            body = _len(FIELDS["name"][col], layer["name"].encode())
            kind = layer["type"]
            body += _int(5, V1_TYPES[kind]) if v1 else _len(2, kind.encode())
            body += b"".join(_len(FIELDS["bottom"][col], b.encode()) for b in layer.get("bottom", []))
            body += b"".join(_len(FIELDS["top"][col], t.encode()) for t in layer.get("top", []))
            for key in ("convolution", "inner_product", "lrn", "pooling", "dropout", "transform"):
                if key in layer:
                    body += _len(FIELDS[key][col], layer[key])
            if layer["name"] in SHAPES:
                shape = SHAPES[layer["name"]]
                weights = rng.standard_normal(shape, np.float32) * np.float32(0.01)
                bias = rng.standard_normal(shape[0], np.float32) * np.float32(0.01)
                body += _len(FIELDS["blobs"][col], _blob(weights, encoding))
                body += _len(FIELDS["blobs"][col], _blob(bias, encoding))
            out.write(_len(2 if v1 else 100, body))
    return path


# --------------------------------------------------------------------------------------------------
# The protobuf library's reader

# Caffe's messages as far as the reader goes: (field, number, label, type, message type, packed), with
# Caffe's field numbers. Strings are bytes (the same on the wire), decoded as the package's reader does.
_SCHEMA: dict[str, list[tuple[str, int, str, str, str, bool]]] = {
    "BlobShape": [("dim", 1, "repeated", "int64", "", True)],
    "BlobProto": [
        ("num", 1, "optional", "int32", "", False), ("channels", 2, "optional", "int32", "", False),
        ("height", 3, "optional", "int32", "", False), ("width", 4, "optional", "int32", "", False),
        ("data", 5, "repeated", "float", "", True), ("shape", 7, "optional", "message", "BlobShape", False),
        ("double_data", 8, "repeated", "double", "", True),
    ],
    "LayerParameter": [
        ("name", 1, "optional", "bytes", "", False), ("type", 2, "optional", "bytes", "", False),
        ("bottom", 3, "repeated", "bytes", "", False), ("top", 4, "repeated", "bytes", "", False),
        ("blobs", 7, "repeated", "message", "BlobProto", False),
    ],
    "V1LayerParameter": [
        ("layer", 1, "optional", "bytes", "", False), ("bottom", 2, "repeated", "bytes", "", False),
        ("top", 3, "repeated", "bytes", "", False), ("name", 4, "optional", "bytes", "", False),
        ("type", 5, "optional", "int32", "", False), ("blobs", 6, "repeated", "message", "BlobProto", False),
    ],
    "NetParameter": [
        ("name", 1, "optional", "bytes", "", False),
        ("layers", 2, "repeated", "message", "V1LayerParameter", False),
        ("input_dim", 4, "repeated", "int32", "", False),
        ("input_shape", 8, "repeated", "message", "BlobShape", False),
        ("layer", 100, "repeated", "message", "LayerParameter", False),
    ],
}  # fmt: skip


def protobuf_messages() -> dict[str, Any]:
    """The message classes of ``_SCHEMA`` plus the parameter fields of the package's reader, as bytes."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    from alexnet_dist.interop import caffe

    schema = {name: list(fields) for name, fields in _SCHEMA.items()}
    for key, (v2, v1) in caffe._PARAM_FIELDS.items():
        schema["LayerParameter"].append((f"{key}_param", v2, "optional", "bytes", "", False))
        if v1 is not None:
            schema["V1LayerParameter"].append((f"{key}_param", v1, "optional", "bytes", "", False))
    proto = descriptor_pb2.FileDescriptorProto(
        name="bench_caffe.proto", package="bench_caffe", syntax="proto2"
    )
    kind = descriptor_pb2.FieldDescriptorProto
    for name, fields in schema.items():
        message = proto.message_type.add(name=name)
        for field, number, label, type_, type_name, packed in fields:
            f = message.field.add(name=field, number=number, label=getattr(kind, f"LABEL_{label.upper()}"))
            f.type = getattr(kind, f"TYPE_{type_.upper()}")
            if type_name:
                f.type_name = f".bench_caffe.{type_name}"
            if packed:
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"bench_caffe.{name}"))
            for name in schema}  # fmt: skip


def protobuf_reader() -> Any:
    """A ``read_caffemodel`` on the protobuf runtime, giving the package's CaffeNet."""
    from alexnet_dist.errors import CheckpointError
    from alexnet_dist.interop import caffe
    from alexnet_dist.interop.protowire import Msg

    classes = protobuf_messages()

    def blob(b: Any, what: str) -> np.ndarray:
        shape = tuple(b.shape.dim) if b.HasField("shape") else (b.num, b.channels, b.height, b.width)
        if len(b.data) or not len(b.double_data):
            data = np.array(b.data, np.float32)  # the runtime's __array__: one copy of its C array
        else:
            data = np.array(b.double_data, np.float64).astype(np.float32)
        if len(data) != np.prod(shape, dtype=np.int64):
            raise CheckpointError(f"{what}: {len(data)} values for shape {shape}")
        return data.reshape(shape)

    def text(raw: bytes) -> str:
        return raw.decode("utf-8", "replace")

    def layer(m: Any, v1: bool, index: int) -> caffe.CaffeLayer:
        name = text(m.name) if m.HasField("name") else f"#{index}"
        kind = caffe._V1_TYPES.get(m.type, f"V1 type {m.type}") if v1 else text(m.type)
        params = {}
        for key in caffe._PARAM_FIELDS:
            field = f"{key}_param"
            if field in m.DESCRIPTOR.fields_by_name and m.HasField(field):
                raw = getattr(m, field)
                params[key] = Msg(raw, 0, len(raw))
        blobs = tuple(blob(b, f"{name}: blob {i}") for i, b in enumerate(m.blobs))
        return caffe.CaffeLayer(
            name, kind, tuple(map(text, m.bottom)), tuple(map(text, m.top)), blobs, params
        )

    def read_caffemodel(path: str | Path) -> caffe.CaffeNet:
        buf = Path(path).read_bytes()
        net = classes["NetParameter"].FromString(buf)
        v1 = not len(net.layer)
        layers = tuple(layer(m, v1, i) for i, m in enumerate(net.layers if v1 else net.layer))
        dims = tuple(net.input_dim) or tuple(d for s in net.input_shape[:1] for d in s.dim)
        encoding = "layers (V1)" if v1 else "layer (V2)"
        return caffe.CaffeNet(text(net.name), encoding, layers, dims, hashlib.sha256(buf).hexdigest())

    return read_caffemodel


# --------------------------------------------------------------------------------------------------
# One run, in its own process


def peak_rss_mib() -> float:
    """This process's peak resident memory since its exec (ru_maxrss would include its parent's at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(reader: str, path: str) -> dict[str, Any]:
    start = time.perf_counter()
    from alexnet_dist.interop import caffe as module

    read = protobuf_reader() if reader == "protobuf" else module.read_caffemodel
    imported = time.perf_counter()
    rss_before = peak_rss_mib()
    spent: list[tuple[float, float]] = []

    def timed_read(*args: Any, **kw: Any) -> Any:
        t, cpu = time.perf_counter(), time.process_time()
        try:
            return read(*args, **kw)
        finally:
            spent.append((time.perf_counter() - t, time.process_time() - cpu))

    module.read_caffemodel = timed_read  # load_caffemodel looks it up in its module
    t, cpu = time.perf_counter(), time.process_time()
    model, _ = module.load_caffemodel(path)
    state = model.state_dict()
    seconds, cpu_s = time.perf_counter() - t, time.process_time() - cpu
    rss_after = peak_rss_mib()
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + state[key].numpy().tobytes())
    from google.protobuf.internal import api_implementation

    return {
        "seconds": seconds, "cpu_s": cpu_s, "read_s": spent[0][0], "read_cpu_s": spent[0][1],
        "import_s": imported - start, "peak_rss_mib_before": rss_before, "peak_rss_mib_after": rss_after,
        "state_sha256": digest.hexdigest(), "protobuf_impl": api_implementation.Type(),
    }  # fmt: skip


def run_child(reader: str, path: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", reader, str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode:
        raise SystemExit(f"{reader} on {path.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    seconds = [r["seconds"] for r in runs]
    return {
        "median_s": median("seconds"),
        "runs_s": [round(s, 3) for s in seconds],
        "spread_pct": round(100 * (max(seconds) - min(seconds)) / statistics.median(seconds), 1),
        "cpu_median_s": median("cpu_s"),
        "cpu_runs_s": [round(r["cpu_s"], 3) for r in runs],
        "read_caffemodel_median_s": median("read_s"),
        "read_caffemodel_cpu_median_s": median("read_cpu_s"),
        "import_median_s": median("import_s"),
        "peak_rss_mib_before": round(median("peak_rss_mib_before")),
        "peak_rss_mib_after": round(median("peak_rss_mib_after")),
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {cpu}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs per reader and encoding")
    parser.add_argument(
        "--encodings", default=",".join(ENCODINGS), help="comma-separated, of " + ", ".join(ENCODINGS)
    )
    parser.add_argument("--dir", default=None, help="folder for the files (default: a temporary one)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from importlib.metadata import version

    from google.protobuf.internal import api_implementation  # torch is imported by the runs only

    encodings = [e for e in args.encodings.split(",") if e]
    if unknown := set(encodings) - set(ENCODINGS):
        raise SystemExit(f"--encodings: unknown {sorted(unknown)}")
    readers = ("hand", "protobuf")
    ratios = {
        "ratio": "median_s",
        "ratio_cpu": "cpu_median_s",
        "ratio_read_cpu": "read_caffemodel_cpu_median_s",
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for encoding in encodings:
            path = write_caffemodel(Path(tmp) / f"{encoding}.caffemodel", encoding)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in readers}
            for i in range(args.repeat):
                for name in readers if i % 2 == 0 else readers[::-1]:
                    runs[name].append(run_child(name, path))
            digests = {r["state_sha256"] for rs in runs.values() for r in rs}
            result = {
                "file_mib": round(path.stat().st_size / 2**20, 1),
                "same_state_dict": len(digests) == 1,
                **{name: summary(rs) for name, rs in runs.items()},
            }
            for ratio, key in ratios.items():
                result[ratio] = round(result["protobuf"][key] / result["hand"][key], 3)
            results[encoding] = result
            path.unlink()
    head = results.get("layers-V1-packed") or next(iter(results.values()))
    largest = max(r["file_mib"] for r in results.values())
    print(json.dumps({
        "figure": head["protobuf"]["median_s"],
        "baseline": head["hand"]["median_s"],
        "ratio": head["ratio"],
        "unit": "s wall, load_caffemodel to state_dict, bvlc_alexnet's encoding (layers-V1-packed), median",
        "encodings": results,
        "repeat": args.repeat,
        "protobuf": version("protobuf"),
        "protobuf_impl": api_implementation.Type(),
        "protobuf_limits": f"defaults kept: messages up to {largest} MiB parsed (the format's ceiling is "
                           "2 GiB), nesting 4 deep (the default recursion limit is 100)",
        "numpy": np.__version__,
        "torch": version("torch"),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
