"""Job specs: what a user writes in ``jobs/*.toml``, validated by pydantic (frozen, extra="forbid").

A spec crosses Redis and Ray as JSON (``JobSpec.model_dump_json()``), never as a pickle.
``--set key=value`` overrides any field by its dotted path (``--set train.epochs=3``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alexnet_dist.errors import ConfigError

__all__ = [
    "CheckpointSpec",
    "DataSpec",
    "JobSpec",
    "ModelSpec",
    "OptimSpec",
    "ScalingSpec",
    "TrainSpec",
    "apply_overrides",
    "load_spec",
    "parse_spec",
    "parse_spec_text",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSpec(_Frozen):
    train: str  # manifest URL of the training shards (local path, file:// or s3://)
    val: str  # manifest URL of the validation shards
    loader_workers: int = Field(1, ge=0, le=64)  # DataLoader processes per Ray Train worker
    shuffle_buffer: int = Field(2000, ge=0)  # samples held for the seeded sample shuffle; 0 = off
    max_bad_fraction: float = Field(0.001, ge=0.0, le=1.0)  # skip corrupt samples up to this share
    pca_lighting: float = Field(0.1, ge=0.0)  # sigma of the PCA colour noise (section 4.1); 0 = off
    # How JPEGs become pixels: "crop" decodes only each view's crop on the CPU (loader workers); "whole"
    # decodes whole images on the CPU; "device" leaves them encoded to the loader workers and decodes each
    # batch on the training device (nvJPEG on a GPU). A sample's crop, flip and lighting are the same
    # function of (seed, epoch, key) whichever runs. No GPU measurement has chosen a GPU default yet.
    decoder: Literal["crop", "whole", "device"] = "crop"
    read_ahead: int = Field(4, ge=0, le=32)  # S3 ranged GETs in flight per loader worker; 0 = one at a time
    read_ahead_chunk_mb: int = Field(8, ge=1, le=256)  # bytes per ranged GET, in MiB


class ModelSpec(_Frozen):
    preset: Literal["paper", "small"] = "paper"
    num_classes: int = Field(1000, ge=2)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)  # None: the preset's (0.5 in the paper)


class OptimSpec(_Frozen):
    # Section 5: SGD, momentum 0.9, weight decay 0.0005, lr 0.01 divided by 10 when the
    # validation error stops improving, three times in all.
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0005, ge=0.0)
    lr_decay: float = Field(0.1, gt=0.0, le=1.0)  # factor applied on a plateau
    plateau_patience: int = Field(1, ge=0)  # epochs without a lower top-1 val error before a decay
    max_decays: int = Field(3, ge=0)
    warmup_epochs: float = Field(0.0, ge=0.0)  # linear warm-up (not in the paper; 0 = off)
    schedule: Literal["plateau", "cosine"] = "plateau"  # cosine: for short fixed-budget runs


class TrainSpec(_Frozen):
    epochs: int = Field(90, ge=1)
    batch_size: int = Field(128, ge=1)  # global: split evenly over the workers (must divide)
    # bf16 autocast on GPU (ignored on CPU): convolutions and matmuls in bf16; LRN is computed in float32
    # (its sum of squares times a small alpha would lose its bits in bf16), softmax and the loss too.
    bf16: bool = True
    channels_last: bool = True  # on GPU; ignored on CPU
    ten_crop_eval: bool = True  # final evaluation on ten crops (section 4.1)
    log_every_steps: int = Field(50, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)  # cap for smoke tests; None = whole epoch
    val_every_epochs: int = Field(1, ge=1)
    # Not in the paper (0 = off): targets (1 - e) on the true class and e / classes elsewhere. Helps a
    # small network on a short budget (jobs/fashion-mnist.toml); the train loss reported includes it.
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # DDP gradient all-reduce in bf16 (torch's bf16_compress_hook): halves the traffic per step; pays
    # when the link, not the GPUs, bounds the step (see cluster/README.md).
    grad_compression: Literal["none", "bf16"] = "none"
    # On GPU: let float32 convolutions and matmuls use TF32 (faster, 10-bit mantissa). False: exact float32.
    tf32: bool = True
    # On GPU: cuDNN's deterministic algorithms and torch.use_deterministic_algorithms, so a resumed run
    # repeats an uninterrupted one bit for bit (slower). Off, cuDNN picks the fastest algorithms (benchmark
    # mode), which may differ from run to run in the last bits. The CPU path is deterministic either way.
    deterministic: bool = False


class ScalingSpec(_Frozen):
    workers: int = Field(1, ge=1)
    # "gpu-pair": two GPUs per worker, one tower each (the paper); "gpu": both towers on one GPU;
    # "cpu": both towers on the CPU.
    devices: Literal["gpu-pair", "gpu", "cpu"] = "cpu"
    cpus_per_worker: float = Field(1.0, gt=0.0)

    @property
    def gpus_per_worker(self) -> int:
        return {"gpu-pair": 2, "gpu": 1, "cpu": 0}[self.devices]


class CheckpointSpec(_Frozen):
    storage: str | None = None  # file://, a local path or s3://bucket/prefix; None: the service default
    every_steps: int = Field(0, ge=0)  # also checkpoint every N steps inside an epoch; 0 = epoch ends only
    # Also checkpoint when this many minutes passed since the last one (checked every log_every_steps steps,
    # agreed by all ranks); 0 = off. A time cadence bounds both the work a crash or a stop loses and the cost
    # of checkpoints on fast GPUs.
    every_minutes: float = Field(30.0, ge=0.0)
    # Mid-run checkpoints upload in the background (Ray Train's ASYNC mode) while training goes on; the
    # final one always uploads before the run ends. False: every rank waits for each upload.
    async_upload: bool = True
    keep: int = Field(3, ge=1)  # newest checkpoints kept


class SchedulingSpec(_Frozen):
    # The dispatcher may ask the job to yield its room to a higher-priority one: it checkpoints at its next
    # logging step, goes back to its place in the queue and later resumes exactly where it stopped.
    preemptible: bool = True


class NotifySpec(_Frozen):
    # Webhooks of this job besides the service's own: a signed JSON POST on each of its state changes and
    # its result (http or https URLs; at most 10).
    urls: list[str] = Field(default_factory=list, max_length=10)

    @model_validator(mode="after")
    def _http_urls(self) -> NotifySpec:
        from urllib.parse import urlsplit

        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"notify.urls: {url!r} is not an http(s) URL with a host")
        return self


class JobSpec(_Frozen):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    priority: int = 0  # higher runs first; FIFO within a priority
    retries: int = Field(1, ge=0)  # worker failures tolerated (Ray) and relaunches (dispatcher)
    data: DataSpec
    model: ModelSpec = ModelSpec()
    optim: OptimSpec = OptimSpec()
    train: TrainSpec = TrainSpec()
    scaling: ScalingSpec = ScalingSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    scheduling: SchedulingSpec = SchedulingSpec()
    notify: NotifySpec = NotifySpec()

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> JobSpec:
        if self.train.batch_size % self.scaling.workers:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must be a multiple of "
                f"scaling.workers={self.scaling.workers} (the global batch is split evenly)"
            )
        return self

    @property
    def per_worker_batch(self) -> int:
        return self.train.batch_size // self.scaling.workers

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return parse_spec(json.loads(text), source="<json>")


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(spec)"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)


def parse_spec(data: dict[str, Any], *, source: str = "<spec>") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: take it as a string


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.path=value`` overrides applied (values parsed as TOML)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw.strip())
    return out


def _absolute(url: str, base: Path) -> str:
    """A relative local path becomes absolute (against ``base``): Ray Jobs and workers run elsewhere."""
    if "://" in url or Path(url).is_absolute():
        return url
    return str((base / url).resolve())


def absolute_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    out = json.loads(json.dumps(data))
    for section, key in (("data", "train"), ("data", "val"), ("checkpoint", "storage")):
        value = out.get(section, {}).get(key)
        if isinstance(value, str) and value:
            out[section][key] = _absolute(value, base)
    return out


def parse_spec_text(
    text: str,
    *,
    json_format: bool = False,
    source: str = "<spec>",
    overrides: list[str] | None = None,
    base: Path | None = None,
) -> JobSpec:
    """A spec from its text, TOML (or JSON); every error names ``source`` and the field. Relative local
    paths are taken from ``base``, and kept as they are without one."""
    if json_format:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"{source}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a spec is a JSON object, not {type(data).__name__}")
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{source}: not valid TOML ({err})") from None
    data = apply_overrides(data, overrides or [])
    if base is not None:
        data = absolute_paths(data, base)
    return parse_spec(data, source=source)


def load_spec(path: str | Path, overrides: list[str] | None = None, *, base: Path | None = None) -> JobSpec:
    """Read a job spec (TOML; JSON when the file ends in ``.json``); every error names the file and the field.

    Relative local paths in it (manifests, checkpoint storage) are taken from ``base``, the current
    directory by default, and stored absolute, since the job runs in other processes and directories.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such spec file; see jobs/ for examples") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (not UTF-8); a spec is TOML or JSON text") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read it ({err.strerror})") from None
    return parse_spec_text(
        text, json_format=p.suffix == ".json", source=str(p), overrides=overrides, base=base or Path.cwd()
    )
