"""Early stopping on validation loss: `train.early_stop_patience` validations in a row without
an improvement of more than `train.early_stop_min_delta` end the run.

The tracker's state goes into every checkpoint's trainer state, so a resumed run counts on
from where the interrupted one was.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    patience: int  # 0: off (the best validation is still tracked)
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0  # validations since the best one

    def update(self, step: int, val_loss: float) -> bool:
        """Record a validation; True when it is the new best."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad_evals = val_loss, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.bad_evals >= self.patience

    def reason(self) -> str:
        return (f"validation loss did not improve by more than {self.min_delta:g} in {self.bad_evals} evaluations "
                f"(best {self.best_loss:.4f} at step {self.best_step})")

    def state(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def restore(self, state: dict | None) -> None:
        if state:
            self.best_loss, self.best_step, self.bad_evals = state["best_loss"], state["best_step"], state["bad_evals"]

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "bad_evals"}
