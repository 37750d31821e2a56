"""Top-1 / top-5 error, counted exactly across ranks (sums of counts, never averages of averages)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alexnet_dist.data.augment import normalize


@dataclass(frozen=True)
class EvalResult:
    top1_correct: int
    top5_correct: int
    samples: int

    @property
    def top1_error(self) -> float:
        return 1.0 - self.top1_correct / self.samples if self.samples else float("nan")

    @property
    def top5_error(self) -> float:
        return 1.0 - self.top5_correct / self.samples if self.samples else float("nan")


def topk_counts(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """[hits at each k..., real samples] as int64 on the scores' device, with no host sync: a row counts
    when its label is among its k highest scores; labels < 0 (padding) never match and are not counted."""
    k_max = min(max(ks), scores.shape[1])
    hits = scores.topk(k_max, dim=1).indices == labels[:, None]
    counts = [hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks]
    return torch.stack([*counts, (labels >= 0).sum()])


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows have their label among the k highest scores, for each k; labels < 0 are padding."""
    return [int(c) for c in topk_counts(scores, labels, ks)[:-1]]


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities; a ten-crop batch [B, 10, 3, S, S] averages the softmax of its crops."""
    if images.dim() == 5:
        b, v = images.shape[:2]
        probs = model(images.flatten(0, 1)).float().softmax(dim=1)
        return probs.view(b, v, -1).mean(dim=1)
    return model(images).float().softmax(dim=1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[Any],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    devices: tuple[torch.device, torch.device],
    autocast: Any = None,
    world: int = 1,
    feed: Any = None,
) -> EvalResult:
    """Run ``model`` (not the DDP wrapper: ranks may see different batch counts) over ``loader``.

    Counts stay on the device until the end (one all-reduce, one read). ``feed``: the training loop's
    :class:`~alexnet_dist.training.inputs.DeviceFeed` (its constants are on the devices already).
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=devices[0])
    for batch in loader:
        if feed is not None:
            x = feed.normalize(batch.images, batch.lighting, devices[0])
        else:
            x = normalize(batch.images, batch.lighting, mean, std, device=devices[0])
        with autocast or contextlib.nullcontext():
            probs = predict(model, x)
        counts += topk_counts(probs, batch.labels.to(probs.device, non_blocking=True))
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(counts)
    model.train(was_training)
    c1, c5, n = counts.tolist()
    return EvalResult(int(c1), int(c5), int(n))
