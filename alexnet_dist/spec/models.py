"""The job spec's sections as pydantic models (frozen, extra="forbid"), each field described for the
JSON Schema, and the one-line error a spec that does not validate gets.

A spec crosses Redis and Ray as JSON (``JobSpec.model_dump_json()``), never as a pickle.
"""

from __future__ import annotations

import json
from typing import Any, Literal

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
    "parse_spec",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSpec(_Frozen):
    """Where the shards are and how they become batches: the manifests `alexnet-dist shards build` wrote,
    and the loader's processes, shuffle, augmentation and S3 reads."""

    train: str = Field(
        description="Manifest of the training shards: a local path (a relative one is taken from the current "
        "directory of `submit` or `spec validate`), file:// or s3://. `alexnet-dist shards build` writes it "
        "beside the shards, e.g. shards/fashion-mnist/fashion-mnist-train.json. Required: nothing to guess."
    )
    val: str = Field(
        description="Manifest of the validation shards (same forms as data.train), e.g. "
        "shards/fashion-mnist/fashion-mnist-test.json. Required: nothing to guess."
    )
    loader_workers: int = Field(
        1,
        ge=0,
        le=64,
        description="DataLoader processes per Ray Train worker that read, decode and augment samples; 0 "
        "decodes in the training process. The default 1 keeps decoding off the training loop on a small "
        "machine; a GPU worker needs many more (jobs/imagenet-paper.toml uses 16).",
    )
    shuffle_buffer: int = Field(
        2000,
        ge=0,
        description="Samples (images) held per loader stream for the seeded sample shuffle on top of the "
        "shuffled shard order; 0 = off. The default mixes across about two shards of `shards build`'s "
        "default 1,000 samples at a small memory cost.",
    )
    max_bad_fraction: float = Field(
        0.001,
        ge=0.0,
        le=1.0,
        description="Share of a stream's samples (0..1) that may be corrupt: each is skipped and counted, "
        "and more than this fails the run. The default 0.1% tolerates a few damaged images, not a broken "
        "shard.",
    )
    pca_lighting: float = Field(
        0.1,
        ge=0.0,
        description="Standard deviation of the PCA colour noise added to each training image (section 4.1: "
        "0.1, along the RGB eigenvectors of the manifest's pixel statistics); 0 = off.",
    )
    decoder: Literal["crop", "whole", "device"] = Field(
        "crop",
        description='How JPEGs become pixels: "crop" decodes only each view\'s crop on the CPU (loader '
        'workers); "whole" decodes whole images on the CPU; "device" hands them encoded to the loader '
        "workers and decodes each batch on the training device (nvJPEG on a GPU). A sample's crop, flip and "
        'lighting are the same function of (seed, epoch, key) whichever runs. "crop" is the default: the '
        "least CPU work per image; no GPU measurement has chosen a GPU default yet.",
    )
    read_ahead: int = Field(
        4,
        ge=0,
        le=32,
        description="S3 ranged GETs in flight per loader worker, so reading overlaps decoding; 0 = one at a "
        "time. The default keeps 4 x data.read_ahead_chunk_mb (32 MiB) buffered per loader worker.",
    )
    read_ahead_chunk_mb: int = Field(
        8,
        ge=1,
        le=256,
        description="Bytes per ranged GET, in MiB. 8 MiB amortizes the request latency of S3 while keeping "
        "little in memory.",
    )


class ModelSpec(_Frozen):
    """The network: which AlexNet, how many classes, its dropout. The defaults are the paper's network for
    ILSVRC-2012."""

    preset: Literal["paper", "small"] = Field(
        "paper",
        description='"paper": the network of section 3 (five convolutional and three fully connected layers '
        'in two towers, 227x227 input, 60,965,224 parameters with 1000 classes); "small": the same topology '
        "at 32x32 with fewer channels, for CPU demos and tests. Default: the paper's.",
    )
    num_classes: int = Field(
        1000,
        ge=2,
        description="Outputs of the last layer; must equal the manifests' class count (checked at submit and "
        "by `alexnet-dist spec validate`). Default: ILSVRC-2012's 1000 classes (section 2).",
    )
    dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Probability of zeroing each unit of fc6 and fc7 in training, in [0, 1). Unset (the "
        "default): the preset's, 0.5 for both (section 4.2).",
    )


class OptimSpec(_Frozen):
    """The optimizer and learning-rate schedule. The defaults are the paper's (section 5): SGD with momentum
    0.9 and weight decay 0.0005, lr 0.01 divided by 10 when the validation error stops improving, three
    times in all."""

    lr: float = Field(
        0.01,
        gt=0.0,
        description="Initial learning rate of SGD, for the global batch (train.batch_size). Section 5: 0.01.",
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum, in [0, 1). Section 5: 0.9.")
    weight_decay: float = Field(
        0.0005,
        ge=0.0,
        description="L2 weight decay factor added to each weight's gradient. Section 5: 0.0005, which the "
        "paper found also lowers the training error.",
    )
    lr_decay: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description='Factor applied to the learning rate on a plateau (schedule "plateau" only), in (0, 1]. '
        "Section 5: divided by 10.",
    )
    plateau_patience: int = Field(
        1,
        ge=0,
        description="Validation rounds (epochs, with train.val_every_epochs = 1) in a row without a lower "
        'top-1 validation error before a decay (schedule "plateau" only). 1: the first round that does not '
        'improve, section 5\'s "when the validation error rate stopped improving".',
    )
    max_decays: int = Field(
        3,
        ge=0,
        description='Most decays of the learning rate in a run (schedule "plateau" only). Section 5: reduced '
        "three times prior to termination.",
    )
    warmup_epochs: float = Field(
        0.0,
        ge=0.0,
        description="Epochs (fractions allowed) of linear warm-up from 0 to optim.lr at the start; 0 = off. "
        "Not in the paper, hence off by default; helps higher learning rates on short runs.",
    )
    schedule: Literal["plateau", "cosine"] = Field(
        "plateau",
        description='"plateau": section 5\'s rule (divide by optim.lr_decay when the validation error stops '
        'improving), the default; "cosine": anneal from optim.lr to zero over train.epochs, for short '
        "fixed-budget runs (jobs/fashion-mnist.toml).",
    )


class TrainSpec(_Frozen):
    """The training loop: length, batch, numerics on the GPU, evaluation and logging. The defaults are the
    paper's run (section 5: batch 128, about 90 epochs) on today's GPUs."""

    epochs: int = Field(
        90,
        ge=1,
        description='Passes over the training set. Section 5: "roughly 90 cycles through the training set".',
    )
    batch_size: int = Field(
        128,
        ge=1,
        description="Global batch in images per step, split evenly over the workers (a multiple of "
        "scaling.workers). Section 5: 128.",
    )
    bf16: bool = Field(
        True,
        description="bf16 autocast on GPU (ignored on CPU): convolutions and matmuls in bf16; LRN is "
        "computed in float32 (its sum of squares times a small alpha would lose its bits in bf16), softmax "
        "and the loss too. On by default for the speed of bf16 tensor cores; the paper trained in float32 "
        "(false to match it).",
    )
    channels_last: bool = Field(
        True,
        description="On GPU, keep activations in channels-last (NHWC) memory layout, the layout cuDNN's "
        "fastest convolutions use; ignored on CPU.",
    )
    ten_crop_eval: bool = Field(
        True,
        description="Final evaluation averages the predictions of ten crops per image (the four corners, the "
        "centre and their flips), as section 4.1 reports; false: the centre crop only.",
    )
    log_every_steps: int = Field(
        50,
        ge=1,
        description="Steps between progress events (loss, images/s) and between checks for a yield request "
        "or a checkpoint.every_minutes checkpoint. 50 keeps the events stream small.",
    )
    max_steps_per_epoch: int | None = Field(
        None,
        ge=1,
        description="Cap on the steps of each epoch, for smoke tests; unset (the default): the whole epoch.",
    )
    val_every_epochs: int = Field(
        1,
        ge=1,
        description="Epochs between validations (the last epoch always validates). 1: the plateau schedule "
        "reads the validation error every epoch.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Targets (1 - e) on the true class and e / classes elsewhere, in [0, 1); the train loss "
        "reported includes it. Not in the paper, hence 0 (off); helps a small network on a short budget.",
    )
    grad_compression: Literal["none", "bf16"] = Field(
        "none",
        description='"bf16": the DDP gradient all-reduce in bf16 (torch\'s bf16_compress_hook), half the '
        "traffic per step; it pays when the link, not the GPUs, bounds the step (cluster/README.md). "
        '"none" (the default): exact float32 gradients, as in the paper.',
    )
    tf32: bool = Field(
        True,
        description="On GPU, let float32 convolutions and matmuls use TF32 (faster, 10-bit mantissa); false: "
        "exact float32.",
    )
    deterministic: bool = Field(
        False,
        description="On GPU, cuDNN's deterministic algorithms and torch.use_deterministic_algorithms, so a "
        "resumed run repeats an uninterrupted one bit for bit (slower). Off (the default), cuDNN picks the "
        "fastest algorithms (benchmark mode), which may differ from run to run in the last bits. The CPU "
        "path is deterministic either way.",
    )


class ScalingSpec(_Frozen):
    """How many Ray Train workers and on what devices. Required: the service cannot guess the hardware a
    job is meant for."""

    workers: int = Field(
        ge=1,
        description="Ray Train workers (data-parallel replicas, DDP averages their gradients); each holds "
        "both towers on its devices and gets train.batch_size / workers images of each step. Required. The "
        "paper trained one replica on one GPU pair.",
    )
    devices: Literal["gpu-pair", "gpu", "cpu"] = Field(
        description='Devices of each worker: "gpu-pair": two GPUs, one tower each (the paper, section 3.2); '
        '"gpu": both towers on one GPU; "cpu": both towers on the CPU. Required.',
    )
    cpus_per_worker: float = Field(
        1.0,
        gt=0.0,
        description="CPUs Ray reserves for each worker (its loader processes included); also the training "
        "process's torch threads on CPU. 1 fits a laptop; a GPU worker with many loader workers needs more.",
    )

    @property
    def gpus_per_worker(self) -> int:
        return {"gpu-pair": 2, "gpu": 1, "cpu": 0}[self.devices]


class CheckpointSpec(_Frozen):
    """Where and how often the run saves checkpoints, from which a failed, stopped or preempted job
    resumes exactly."""

    storage: str | None = Field(
        None,
        description="Where checkpoints go: a local path, file:// or s3://bucket/prefix. Unset (the default): "
        "the service's storage root (ALEXNET_DIST_STORAGE).",
    )
    every_steps: int = Field(
        0,
        ge=0,
        description="Also checkpoint every N steps inside an epoch; 0 (the default): at epoch ends only, "
        "with checkpoint.every_minutes bounding the work lost.",
    )
    every_minutes: float = Field(
        30.0,
        ge=0.0,
        description="Also checkpoint when this many minutes passed since the last one (checked every "
        "train.log_every_steps steps, agreed by all ranks); 0 = off. A time cadence bounds both the work a "
        "crash or a stop loses and the cost of checkpoints on fast GPUs; 30 minutes loses little of a "
        "multi-day run.",
    )
    async_upload: bool = Field(
        True,
        description="Mid-run checkpoints upload in the background (Ray Train's ASYNC mode) while training "
        "goes on; the final one always uploads before the run ends. False: every rank waits for each upload.",
    )
    keep: int = Field(
        3,
        ge=1,
        description="Newest checkpoints kept; older ones are deleted. 3 leaves a spare if the newest is "
        "damaged.",
    )


class SchedulingSpec(_Frozen):
    """What the dispatcher may do with the job besides launching it."""

    preemptible: bool = Field(
        True,
        description="The dispatcher may ask the job to yield its room to a higher-priority one: it "
        "checkpoints at its next logging step, goes back to its place in the queue and later resumes exactly "
        "where it stopped. On by default, since a resumed run loses nothing; false pins the job.",
    )


class NotifySpec(_Frozen):
    """Webhooks of this job, besides the service's own (ALEXNET_DIST_WEBHOOKS)."""

    urls: list[str] = Field(
        default_factory=list,
        max_length=10,
        description="http or https URLs (at most 10) that get a signed JSON POST on each of the job's state "
        "changes and its result. None by default.",
    )

    @model_validator(mode="after")
    def _http_urls(self) -> NotifySpec:
        from urllib.parse import urlsplit

        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"notify.urls: {url!r} is not an http(s) URL with a host")
        return self


class JobSpec(_Frozen):
    """A training job: its name and seed, its data, and how it scales. Everything else defaults to the
    paper's recipe (Krizhevsky, Sutskever and Hinton 2012): `alexnet-dist spec explain` lists every field."""

    name: str = Field(
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The job's name: letters, digits and _ . -, at most 100 characters; its id is the name "
        "and a suffix (name-xxxxxxxx). Required.",
    )
    seed: int = Field(
        0,
        description="Seeds the initial weights, the shard and sample order, the augmentation and dropout: "
        "the same seed and spec repeat a run (bit for bit on CPU, or on GPU with train.deterministic).",
    )
    priority: int = Field(
        0,
        description="Higher runs first; jobs of one priority run first in, first out. `submit --priority` "
        "overrides it.",
    )
    retries: int = Field(
        1,
        ge=0,
        description="Worker failures Ray Train tolerates within a run, and relaunches by the dispatcher from "
        "the newest checkpoint. 1 survives one lost worker. A node lost under the run (with no restarts "
        "left to Ray Train) and a restarted Ray head are never counted: the job is queued again.",
    )
    data: DataSpec = Field(description="The [data] section: manifests and loader. Required.")
    model: ModelSpec = Field(ModelSpec(), description="The [model] section: the network.")
    optim: OptimSpec = Field(OptimSpec(), description="The [optim] section: SGD and the learning rate.")
    train: TrainSpec = Field(TrainSpec(), description="The [train] section: the training loop.")
    scaling: ScalingSpec = Field(description="The [scaling] section: workers and their devices. Required.")
    checkpoint: CheckpointSpec = Field(CheckpointSpec(), description="The [checkpoint] section.")
    scheduling: SchedulingSpec = Field(SchedulingSpec(), description="The [scheduling] section: preemption.")
    notify: NotifySpec = Field(NotifySpec(), description="The [notify] section: the job's webhooks.")

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


# What to write when a required field is missing: pydantic's "Field required" says neither the line to add
# nor the choices. A whole missing section stands for its required fields.
_MISSING = {
    "name": 'add name = "my-job" (letters, digits and _ . -)',
    "data.train": 'add [data] train = "<manifest>" (a path, file:// or s3://; `alexnet-dist shards build`)',
    "data.val": 'add [data] val = "<manifest>" (a path, file:// or s3://; `alexnet-dist shards build`)',
    "scaling.devices": 'add [scaling] devices = "gpu-pair" (the paper: one tower per GPU), "gpu" or "cpu"',
    "scaling.workers": "add [scaling] workers = N (Ray Train workers; train.batch_size is split over them)",
}
_SECTION_FIELDS = {"data": ("data.train", "data.val"), "scaling": ("scaling.devices", "scaling.workers")}


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(spec)"
        if e["type"] == "missing":
            for field in _SECTION_FIELDS.get(loc, (loc,)):
                hint = _MISSING.get(field, f"add it (see `alexnet-dist spec explain {field}`)")
                parts.append(f"{field}: missing; {hint}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)


def parse_spec(data: dict[str, Any], *, source: str = "<spec>") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None
