"""The GPU-only parts of the training loop, run on the CPU: every line that a GPU run takes runs here.

- collectives get tensors on devices the configured backend serves (the GPU backend is "cpu:gloo,cuda:nccl");
- a resume that changes the weights' memory layout continues with the right momentum;
- a training step reads no device value back to the host (a host sync on a GPU), but on logging steps;
- the uint8 batch is normalized on each tower's own device, and maps cross devices in the compute dtype;
- checkpoints every N minutes are agreed by the ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from jobspecs import cpu_spec
from shardkit import build_fashion
from torch.utils._python_dispatch import TorchDispatchMode

from alexnet_dist.model.network import AlexNet, _cross, build_model
from alexnet_dist.settings import Settings
from alexnet_dist.spec import JobSpec
from alexnet_dist.training import loop, resumption
from alexnet_dist.training.driver import process_group_backend, worker_config
from alexnet_dist.training.inputs import DeviceFeed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(fashion_mnist_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gpu-path")
    train = build_fashion(fashion_mnist_dir, root / "train", limit=192, shard_size=32)
    val = build_fashion(fashion_mnist_dir, root / "val", limit=64, shard_size=32, split="test")
    return {"train": train.url, "val": val.url, "root": str(root)}


def _spec(tiny, **overrides) -> JobSpec:
    return cpu_spec(tiny["train"], tiny["val"], tiny["root"] + "/runs", **overrides)


class OneProcess:
    """A session of rank 0 of 1 that keeps its reports (what the loop sees of a runner)."""

    rank, world_size = 0, 1

    def __init__(self) -> None:
        self.reports: list[dict] = []

    def devices(self, mode):
        return torch.device("cpu"), torch.device("cpu")

    def latest_checkpoint(self):
        return None

    def report(self, metrics, checkpoint_dir, name, *, background=False):
        self.reports.append({"metrics": metrics, "checkpoint": checkpoint_dir is not None, "bg": background})
        if background:  # a background upload's folder is the runner's to delete
            shutil.rmtree(checkpoint_dir)


# -- 1. collectives ----------------------------------------------------------------------------------

SERVED = {"gloo": {"cpu"}, "nccl": {"cuda"}}


def served_devices(backend: str) -> set[str]:
    """Device types a torch.distributed backend string serves: "gloo", "nccl" or "cpu:gloo,cuda:nccl"."""
    if ":" not in backend:
        return SERVED[backend]
    return {part.split(":")[0] for part in backend.split(",")}


RECORDER = """
import json, os, sys
import torch.distributed as dist
seen = []
def wrap(name):
    real = getattr(dist, name)
    def call(tensor, *args, **kwargs):
        seen.append([name, tensor.device.type, str(tensor.dtype)])
        return real(tensor, *args, **kwargs)
    setattr(dist, name, call)
for name in ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
    wrap(name)
from alexnet_dist.training import local
code = local.main(sys.argv[1:])
assert code == 0, code
with open(os.environ["RECORD_TO"] + "." + os.environ.get("RANK", "0"), "w") as f:
    json.dump(seen, f)
"""


@pytest.mark.slow
def test_every_collective_gets_a_tensor_its_backend_serves(tiny, tmp_path) -> None:
    """Two torchrun processes train one epoch; every tensor passed to a collective is recorded."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(_spec(tiny, train__epochs=1, checkpoint__storage=str(tmp_path / "runs")).to_json())
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    env = {**os.environ, "RECORD_TO": str(tmp_path / "seen"), "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           str(script), str(spec_file), "--set", "train.log_every_steps=2"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [tuple(x) for r in (0, 1) for x in json.loads((tmp_path / f"seen.{r}").read_text())]
    assert {name for name, *_ in seen} >= {"all_reduce"}  # the epoch's loss and the evaluation's counts
    gpu_spec = _spec(tiny, scaling={"workers": 2, "devices": "gpu"})
    backend = process_group_backend(gpu_spec)
    assert backend == "cpu:gloo,cuda:nccl"
    # On a GPU node the same tensors live on the CPU (gloo) or on d0 (NCCL): both are served.
    assert {device for _, device, _ in seen} <= served_devices(backend)
    # plain "nccl", the backend before, would have refused the CPU ones at the first validation
    assert {device for _, device, _ in seen} - served_devices("nccl")


def test_the_backend_is_gloo_on_cpus_and_both_on_gpus(tiny) -> None:
    assert process_group_backend(_spec(tiny)) == "gloo"
    gpu = _spec(tiny, scaling={"workers": 2, "devices": "gpu-pair"})
    config, _ = worker_config(gpu, run_name="r", settings=Settings(storage_root=tiny["root"]))
    assert config["backend"] == "cpu:gloo,cuda:nccl"


# -- 2. the optimizer's state across memory layouts ---------------------------------------------------


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)


@pytest.mark.parametrize("saved_cl, resumed_cl", [(False, True), (True, False)])
def test_a_resume_on_another_layout_continues_exactly(saved_cl: bool, resumed_cl: bool) -> None:
    """Two steps, a checkpoint, two more steps on the other layout == four steps on one layout."""

    def weights(cl: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        w = [torch.randn(8, 6, 5, 5), torch.randn(16, 8, 3, 3), torch.randn(10)]
        layout = torch.channels_last if cl else torch.contiguous_format
        return [x.contiguous(memory_format=layout).requires_grad_() if x.dim() == 4 else x.requires_grad_()
                for x in w]  # fmt: skip

    grads = [[torch.randn(8, 6, 5, 5), torch.randn(16, 8, 3, 3), torch.randn(10)] for _ in range(4)]

    def steps(params, opt, which) -> None:
        for i in which:
            for p, g in zip(params, grads[i], strict=True):
                p.grad = g.contiguous(memory_format=torch.channels_last) if p.is_contiguous(
                    memory_format=torch.channels_last) and g.dim() == 4 else g.clone()  # fmt: skip
            opt.step()

    ref = weights(saved_cl)
    ref_opt = _sgd(ref)
    steps(ref, ref_opt, range(4))

    first = weights(saved_cl)
    opt = _sgd(first)
    steps(first, opt, range(2))
    state = {"params": [p.detach().clone() for p in first], "opt": opt.state_dict()}

    resumed = weights(resumed_cl)
    with torch.no_grad():
        for p, saved in zip(resumed, state["params"], strict=True):
            p.copy_(saved)
    opt2 = _sgd(resumed)
    opt2.load_state_dict(state["opt"])
    bad = [p for p in resumed if p.dim() == 4 and opt2.state[p]["momentum_buffer"].stride() != p.stride()]
    assert bad, "the saved buffers keep their own strides: the case this guards"
    resumption.align_optimizer_state(opt2)
    assert all(opt2.state[p]["momentum_buffer"].stride() == p.stride() for p in resumed)
    steps(resumed, opt2, range(2, 4))
    for a, b in zip(ref, resumed, strict=True):
        assert torch.equal(a.detach(), b.detach())


# -- 3. no host sync in a step --------------------------------------------------------------------------


class ValueReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to Python: on a GPU each one waits for the device."""

    READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.counting = False  # from the first step on (the loader's start reads a seed, once an epoch)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and func.__name__.split(".")[0] in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back_but_on_logging_steps(tiny) -> None:
    spec = _spec(tiny, scaling={"workers": 1, "devices": "cpu"}, train__epochs=1, train__log_every_steps=3,
                 checkpoint__every_steps=0, data__loader_workers=1)  # fmt: skip
    config, _ = worker_config(spec, run_name="sync", settings=Settings(storage_root=tiny["root"]))
    w = loop.setup(config, OneProcess())
    steps = len(w.train_loader)
    logs = sum(1 for s in range(1, steps + 1) if s % 3 == 0 or s == steps)
    reads = ValueReads()
    w.model.register_forward_pre_hook(lambda *_: setattr(reads, "counting", True))
    with reads:
        loss_sum, seen, _ = loop.train_epoch(w)
    assert steps == 6 and seen == steps * spec.per_worker_batch
    assert reads.count == logs  # one loss.item() a logged step; none in the other steps
    assert loss_sum.device == w.devices[0]


# -- 4. each tower's input on its own device; crossings in the compute dtype ---------------------------


def test_each_tower_normalizes_the_uint8_batch_on_its_own_device(tiny) -> None:
    d0, d1 = torch.device("cpu"), torch.device("cpu", 0)  # two device objects: the two-device code path
    feed = DeviceFeed((10.0, 20.0, 30.0), (2.0, 3.0, 4.0), (d0, d1))
    calls = []
    real = feed.normalize
    feed.normalize = lambda images, lighting, device: (
        calls.append((images.dtype, device)) or real(images, lighting, device)
    )

    class B:
        images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
        lighting = torch.zeros(4, 3)
        labels = torch.tensor([1, 2, -1, 3])
        keys = ["a", "b", "", "c"]  # padding has no key

    (out,) = list(feed([B()]))
    assert calls == [(torch.uint8, d0), (torch.uint8, d1)]  # the uint8 batch went to each device
    assert out.inputs[0] is not out.inputs[1] and torch.equal(out.inputs[0], out.inputs[1])
    assert out.valid == 3
    model = build_model("small", num_classes=10)
    seen = {}
    model.tower_b.conv1.register_forward_pre_hook(lambda m, args: seen.setdefault("b", args[0]))
    model(*out.inputs)
    assert seen["b"] is out.inputs[1]  # tower B computed on its own copy, not one sent from tower A


def test_maps_cross_between_devices_in_the_compute_dtype() -> None:
    t = torch.randn(2, 8, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _cross(t, torch.device("cpu", 0)).dtype == torch.bfloat16  # another device: bf16
        assert _cross(t, t.device) is t  # the same device: nothing moves
    assert _cross(t, torch.device("cpu", 0)).dtype == torch.float32  # no autocast: as it is
    m = AlexNet(10, config=build_model("small").config, devices=("cpu", "cpu"))
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_the_device_decoder_trains_to_the_weights_of_the_cpu_decoder(tiny) -> None:
    """data.decoder="device" through the loop: batches decoded on the training device (here the CPU)."""
    final = {}
    for decoder in ("whole", "device"):
        one = {"workers": 1, "devices": "cpu"}
        spec = _spec(tiny, scaling=one, train__epochs=1, checkpoint__every_steps=0, data__decoder=decoder,
                     data__loader_workers=1)  # fmt: skip
        config, _ = worker_config(spec, run_name=decoder, settings=Settings(storage_root=tiny["root"]))
        w = loop.setup(config, OneProcess())
        loop.train_epoch(w)
        final[decoder] = {k: v.clone() for k, v in w.model.state_dict().items()}
    assert all(torch.equal(final["whole"][k], final["device"][k]) for k in final["whole"])


# -- 6. checkpoints by time ----------------------------------------------------------------------------


def test_checkpoints_every_n_minutes_on_log_steps(tiny, monkeypatch) -> None:
    spec = _spec(tiny, scaling={"workers": 1, "devices": "cpu"}, train__epochs=1, train__log_every_steps=1,
                 checkpoint__every_steps=0, checkpoint__every_minutes=1.0)  # fmt: skip
    config, _ = worker_config(spec, run_name="minutes", settings=Settings(storage_root=tiny["root"]))
    session = OneProcess()
    w = loop.setup(config, session)
    now = [0.0]  # a clock that moves 40 s with every step
    monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
    w.model.register_forward_pre_hook(lambda *_: now.__setitem__(0, now[0] + 40.0))
    w.last_checkpoint = 0.0
    loop.train_epoch(w)
    # steps at 40, 80, 120, 160, 200 s (the 6th ends the epoch): due at 80 (80 s since 0) and 160
    mid = [r for r in session.reports if r["checkpoint"]]
    assert [r["metrics"]["step"] for r in mid] == [2, 4]
    assert all(r["bg"] for r in mid)  # uploaded in the background (checkpoint.async_upload)
