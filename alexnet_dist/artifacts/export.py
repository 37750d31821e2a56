"""Export a trained model to ONNX or TorchScript, for programs that do not run this package.

The exported graph takes ``input``, a float32 batch ``[N, 3, S, S]`` of preprocessed crops (any N), and
returns ``logits``, ``[N, num_classes]`` (no softmax). How an image becomes one such crop travels inside the
file, as one document (:func:`export_metadata`):

* ONNX: ``metadata_props``, one entry per key of the document, each value JSON-encoded (so a reader
  does ``{p.key: json.loads(p.value) for p in model.metadata_props}``); the model's ``doc_string`` says the
  same in words;
* TorchScript: the extra file ``preprocess.json`` (``torch.jit.load(f, _extra_files={"preprocess.json":
  ""})``).

The document's keys: ``channel_order`` ("RGB" or "BGR"), ``scale``, ``mean``, ``std`` (per channel, in
``channel_order``), ``resize`` and ``resize_mode`` ("shorter": shorter side to ``resize``, aspect kept;
"warp": to ``resize`` x ``resize``), ``crop`` (= ``input_size``: the centre crop's side), ``class_names``
(output index -> name), ``num_classes``, ``preset``, ``source`` (the MODEL exported: job, URL or file),
``trained`` (the model file's own record of its training run), ``alexnet_dist_version``, and the
``input`` / ``output`` names and shapes. A crop is ``(pixels_in_[0,1] * scale - mean) / std`` in CHW order,
as :func:`alexnet_dist.model.file.preprocess_image` computes it.

The network runs the same function as in training, through plain torch operators: the CPU C kernels
(LRN, max-pooling) are opaque to tracing, so the export traces a copy of the model (:func:`plain_model`)
whose LRN is written with convolution and power operators (:class:`PlainLRN`) and whose pooling is
torch's own.

ONNX goes through ``torch.onnx.export(dynamo=True)``, the default and recommended exporter of torch 2.14:
it needs ``onnxscript`` (pure Python), and ``torch.export`` proves the batch axis really is dynamic (it
fails rather than bake a size in). The TorchScript-based exporter (``dynamo=False``) would need only
``onnx``, but torch 2.14 warns that it will be removed.

Files are written whole to a temporary name beside the target, then renamed: a reader never sees a
half-written file, and a failed export leaves any earlier file in place.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_dist import __version__
from alexnet_dist.artifacts.classify import LoadedModel
from alexnet_dist.errors import ConfigError, StorageError
from alexnet_dist.model.network import AlexNet

__all__ = [
    "FORMATS",
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "PREPROCESS_FILE",
    "export_metadata",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "format_for_path",
    "plain_model",
]

FORMATS = ("onnx", "torchscript")
SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}
OPSET = 18  # the lowest opset torch 2.14's exporter translates to natively; higher ones are converted up
INPUT_NAME, OUTPUT_NAME = "input", "logits"
PREPROCESS_FILE = "preprocess.json"  # the TorchScript extra file holding export_metadata()
TRACE_BATCH = 2  # the example batch traced; the exported batch axis is dynamic
_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")
_PROTOBUF_LIMIT = 2**31 - 1  # one serialized ONNX protobuf; AlexNet's 61M float32 weights are 244 MB


def format_for_path(path: str | Path, fmt: str | None = None) -> str:
    """``fmt`` checked, or the format the suffix of ``path`` names (.onnx; .pt or .ts: TorchScript)."""
    if fmt is not None:
        if fmt.lower() not in FORMATS:
            raise ConfigError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")
        return fmt.lower()
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(
            f"{path}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
            f"name it .onnx, .pt or .ts, or give --format {'|'.join(FORMATS)}"
        )
    return SUFFIXES[suffix]


# --------------------------------------------------------------------------------------------------
# the network in plain torch operators


class PlainLRN(nn.Module):
    """The paper's LRN (``model.network.local_response_norm``) as traceable operators.

    ``y = x * (k + alpha * sum_{j in W(c)} x_j^2)^-beta``, the window ``W(c)`` running from ``(n-1)//2``
    channels below ``c`` to the rest above, zeros past the edges, as the model's band matrix does. The sum
    over the window is a 3-d convolution with an ``n x 1 x 1`` kernel along the channel axis, so the graph
    does not depend on the channel count (the same module serves conv1's and conv2's maps).
    """

    def __init__(self, size: int, alpha: float, beta: float, k: float) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self.pad = ((size - 1) // 2, size - 1 - (size - 1) // 2)
        self.register_buffer("window", torch.full((1, 1, size, 1, 1), alpha, dtype=torch.float32))
        self.register_buffer("bias", torch.full((1,), k, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = F.pad((x * x).unsqueeze(1), (0, 0, 0, 0, *self.pad))  # [N, 1, C + n - 1, H, W]
        scale = F.conv3d(squares, self.window, self.bias).squeeze(1)
        return x * scale.pow(-self.beta)

    def relu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """LRN(ReLU(x)), as the model's LRN modules provide it."""
        return self.forward(F.relu(x))


def plain_model(model: AlexNet) -> AlexNet:
    """A copy of ``model`` on the CPU, in eval mode, whose LRN and pooling are plain torch operators.

    Same parameters, same forward; only the two layers that may call the C kernels are swapped.
    """
    plain = copy.deepcopy(model).place(("cpu", "cpu")).float().eval()
    for tower in (plain.tower_a, plain.tower_b):
        lrn = tower.lrn
        tower.lrn = PlainLRN(lrn.size, lrn.alpha, lrn.beta, lrn.k)
        tower.pool = nn.MaxPool2d(tower.pool.kernel_size, tower.pool.stride)
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain


# --------------------------------------------------------------------------------------------------
# metadata


def export_metadata(loaded: LoadedModel) -> dict[str, Any]:
    """What a program needs to feed the exported graph and read its output (see the module docstring)."""
    meta, model = loaded.meta, loaded.model
    pre = meta["preprocess"]
    crop = int(pre["crop"])
    doc: dict[str, Any] = {
        "input": {"name": INPUT_NAME, "shape": ["batch", model.config.in_channels, crop, crop],
                  "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", model.num_classes], "meaning": "logits"},
        "channel_order": str(pre["channel_order"]),
        "scale": float(pre["scale"]),
        "mean": [float(m) for m in pre["mean"]],
        "std": [float(s) for s in pre["std"]],
        "crop": crop,
        "input_size": crop,
    }  # fmt: skip
    if pre.get("resize") is not None:
        doc["resize"] = int(pre["resize"])
        doc["resize_mode"] = str(pre.get("resize_mode", "warp"))
    doc.update(
        class_names=list(loaded.names),
        num_classes=model.num_classes,
        preset=model.config.name,
        source=loaded.source,
        trained=meta.get("source"),
        alexnet_dist_version=__version__,
    )
    return doc


def _describe(doc: dict[str, Any]) -> str:
    """The preprocessing in words, for the ONNX ``doc_string``."""
    if "resize" in doc:
        how = "shorter side to" if doc["resize_mode"] == "shorter" else "warped to"
        resize = f"resize ({how} {doc['resize']}), "
    else:
        resize = ""
    return (
        f"AlexNet ({doc['preset']} preset, {doc['num_classes']} classes) exported by alexnet-dist "
        f"{doc['alexnet_dist_version']} from {doc['source']}. Input '{INPUT_NAME}': float32 "
        f"[N, 3, {doc['crop']}, {doc['crop']}]; per image: {resize}centre crop {doc['crop']}, "
        f"{doc['channel_order']} channels, (pixel/255 * scale - mean) / std per channel, CHW. Output "
        f"'{OUTPUT_NAME}': [N, {doc['num_classes']}] logits. metadata_props hold the values, JSON-encoded."
    )


# --------------------------------------------------------------------------------------------------
# writing


def _write_atomic(path: Path, data: bytes) -> Path:
    """``data`` to ``path`` via a temporary file in the same folder and a rename.

    The temporary name is unique per call and created exclusively (mode from the umask, as any file).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise StorageError(
            f"{path}: cannot write ({err.strerror}); check the folder and free space"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)  # there only when the rename did not happen
    return path


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """Raise these loggers to WARNING for a while: the ONNX optimizer logs every pass at INFO."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _example(model: AlexNet, crop: int) -> torch.Tensor:
    if crop != model.config.image_size:
        raise ConfigError(
            f"model metadata: crop {crop} but the network takes {model.config.image_size} px inputs"
        )
    return torch.zeros(TRACE_BATCH, model.config.in_channels, crop, crop)


def export_onnx(loaded: LoadedModel, path: str | Path, *, opset: int = OPSET) -> Path:
    """Write ``loaded`` as one ONNX file at ``path``: ``input`` [N, 3, S, S] -> ``logits``, with metadata."""
    try:
        import onnx
        import onnxscript  # noqa: F401  torch's dynamo exporter translates through it
    except ImportError as err:
        raise ConfigError(
            f"ONNX export needs the onnx and onnxscript packages ({err.name} is missing): "
            "pip install 'alexnet-dist[export]'"
        ) from None
    newest = onnx.defs.onnx_opset_version()
    if not OPSET <= opset <= newest:
        raise ConfigError(f"--opset {opset}: use {OPSET} to {newest} (this onnx package's newest)")
    doc = export_metadata(loaded)
    plain = plain_model(loaded.model)
    x = _example(plain, doc["crop"])
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), _quiet(_EXPORTER_LOGGERS):
        program = torch.onnx.export(
            plain,
            (x,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    got = next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    if got != opset:  # the exporter keeps its own opset when converting to the one asked for fails
        raise ConfigError(
            f"--opset {opset}: the exporter could not convert the graph (it gave {got}); try {OPSET}"
        )
    for key, value in doc.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    proto.doc_string = _describe(doc)
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise ConfigError(
            f"{path}: the model is over 2 GB, more than one ONNX file holds; export TorchScript"
        )
    return _write_atomic(Path(path), proto.SerializeToString())


def export_torchscript(loaded: LoadedModel, path: str | Path) -> Path:
    """Write ``loaded`` as a TorchScript file at ``path``, with ``preprocess.json`` as an extra file."""
    doc = export_metadata(loaded)
    plain = plain_model(loaded.model)
    x = _example(plain, doc["crop"])
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.14 marks torch.jit deprecated; TorchScript files remain what libtorch (C++) programs load
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(plain, (x,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={PREPROCESS_FILE: json.dumps(doc, indent=1)})
    return _write_atomic(Path(path), buf.getvalue())


def export_model(
    loaded: LoadedModel, path: str | Path, fmt: str | None = None, *, opset: int = OPSET
) -> Path:
    """Export in ``fmt`` ("onnx" or "torchscript"; by default from the suffix of ``path``)."""
    fmt = format_for_path(path, fmt)
    if fmt == "onnx":
        return export_onnx(loaded, path, opset=opset)
    return export_torchscript(loaded, path)
