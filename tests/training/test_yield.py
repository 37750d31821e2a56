"""A run asked to yield checkpoints at its next logging step and stops; run again, it ends exactly where
one that never stopped ends (the service's preemption, through the local runner and a real redis-server)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis as redis_py
import torch
from jobspecs import cpu_spec
from shardkit import build_fashion

from alexnet_dist.errors import JobYielded
from alexnet_dist.events import YieldSignal
from alexnet_dist.settings import Settings
from alexnet_dist.training.local import run_local


@pytest.fixture(scope="module")
def tiny(fashion_mnist_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("yield")
    train = build_fashion(fashion_mnist_dir, root / "train", limit=192, shard_size=32)
    val = build_fashion(fashion_mnist_dir, root / "val", limit=64, shard_size=32, split="test")
    return {"train": train.url, "val": val.url}


def _weights(url: str) -> dict[str, torch.Tensor]:
    return torch.load(url.removeprefix("file://"), weights_only=True)["model"]


def test_a_yielded_run_resumes_to_the_weights_of_one_that_never_stopped(
    tiny, redis_url, tmp_path, monkeypatch
) -> None:
    def spec(storage: Path):
        return cpu_spec(tiny["train"], tiny["val"], str(storage), scaling={"workers": 1, "devices": "cpu"},
                        train__epochs=2, train__log_every_steps=2, checkpoint__every_steps=0)  # fmt: skip

    whole = run_local(spec(tmp_path / "whole"), run_name="r", settings=Settings())

    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    client.hset("y:job:r", mapping={"yield_requested": "0"})
    signal = YieldSignal(redis_url, "y:job:r")
    steps = []

    class AskAfterThree:
        """Sets the field once the run has passed step 3, as the dispatcher would mid-epoch."""

        def requested(self) -> bool:
            steps.append(1)
            if len(steps) == 2:  # the second logging step: step 4 of epoch 1
                client.hset("y:job:r", "yield_requested", "1764000000.0")
            return signal.requested()

    from alexnet_dist.training import loop

    # the signal rank 0 polls: the real one, with the field set once the run has passed step 3
    monkeypatch.setattr(loop.YieldSignal, "from_dict", classmethod(lambda cls, d: AskAfterThree()))
    with pytest.raises(JobYielded, match="yielded at step 4"):
        run_local(spec(tmp_path / "run"), run_name="r", settings=Settings(), yield_signal=signal)
    monkeypatch.undo()
    run_dir = tmp_path / "run" / "r"
    newest = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_"))[-1]
    assert newest.startswith("checkpoint_0000000004_")  # checkpointed at the step it yielded
    assert not (run_dir / "model.pt").exists()  # a yielded run writes no model file

    client.hset("y:job:r", "yield_requested", "0")  # the next attempt is not asked
    resumed = run_local(spec(tmp_path / "run"), run_name="r", settings=Settings(), yield_signal=signal)
    assert resumed.steps == whole.steps == 12
    a, b = _weights(whole.model_url), _weights(resumed.model_url)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.top1_error == whole.top1_error
