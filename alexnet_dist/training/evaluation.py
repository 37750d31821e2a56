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


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows have their label among the k highest scores, for each k; labels < 0 are padding."""
    keep = labels >= 0
    scores, labels = scores[keep], labels[keep]
    k_max = min(max(ks), scores.shape[1])
    top = scores.topk(k_max, dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, : min(k, k_max)].any(dim=1).sum()) for k in ks]


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
) -> EvalResult:
    """Run ``model`` (not the DDP wrapper: ranks may see different batch counts) over ``loader``."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    for batch in loader:
        x = normalize(batch.images, batch.lighting, mean, std, device=devices[0])
        with autocast or contextlib.nullcontext():
            probs = predict(model, x)
        labels = batch.labels.to(probs.device)
        c1, c5 = topk_correct(probs, labels)
        counts += torch.tensor([c1, c5, int((labels >= 0).sum())], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(counts)
    model.train(was_training)
    return EvalResult(int(counts[0]), int(counts[1]), int(counts[2]))
