"""Learning-rate schedules, with their state as a small JSON-able dict for checkpoints.

The paper's (section 5): start at 0.01 and divide by 10 "when the validation error rate stopped improving
with the current learning rate", three times before termination. We read "stopped improving" as:
``patience`` validation rounds in a row without a lower top-1 error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from alexnet_dist.spec import OptimSpec


@dataclass
class LRSchedule:
    base_lr: float
    kind: str = "plateau"  # "plateau" (the paper) or "cosine" (fixed budgets: demos, smoke runs)
    decay: float = 0.1
    patience: int = 1
    max_decays: int = 3
    warmup_steps: int = 0
    total_steps: int = 1
    # state
    lr: float = 0.0
    best_error: float = math.inf
    bad_rounds: int = 0
    decays: int = 0

    @classmethod
    def from_spec(cls, optim: OptimSpec, *, steps_per_epoch: int, epochs: int) -> LRSchedule:
        return cls(
            base_lr=optim.lr,
            kind=optim.schedule,
            decay=optim.lr_decay,
            patience=optim.plateau_patience,
            max_decays=optim.max_decays,
            warmup_steps=int(optim.warmup_epochs * steps_per_epoch),
            total_steps=max(1, steps_per_epoch * epochs),
            lr=optim.lr,
        )

    def lr_at(self, global_step: int) -> float:
        """The learning rate for the step about to run (0-based ``global_step``)."""
        if self.warmup_steps and global_step < self.warmup_steps:
            return self.lr * (global_step + 1) / self.warmup_steps
        if self.kind == "cosine":
            t = min(1.0, global_step / self.total_steps)
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.lr

    def observe(self, val_error: float) -> bool:
        """Record a validation top-1 error; return True when the rate was divided (plateau only)."""
        if val_error < self.best_error - 1e-9:
            self.best_error, self.bad_rounds = val_error, 0
            return False
        self.bad_rounds += 1
        if self.kind == "plateau" and self.bad_rounds > self.patience - 1 and self.decays < self.max_decays:
            self.lr *= self.decay
            self.decays += 1
            self.bad_rounds = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["best_error"] = None if math.isinf(self.best_error) else self.best_error
        return d

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("lr", "bad_rounds", "decays"):
            setattr(self, k, state[k])
        self.best_error = math.inf if state["best_error"] is None else state["best_error"]
