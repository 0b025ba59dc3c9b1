"""The exception types for user mistakes and for a run that cannot go on.

Anything a user can cause (a bad flag, a missing file, a corrupt weight file) raises
`LmforgeError` with a message that says what is wrong and what to do. The CLI prints
that one line and exits non-zero; everything else is a bug and keeps its traceback.
Callers that must tell one kind of failure from another catch a subclass, never the wording.
"""


class LmforgeError(Exception):
    """A user-facing error: the message is shown as-is, without a traceback."""


class LossDiverged(LmforgeError):
    """The training loss became NaN or infinite: the settings (often the learning rate) or the
    data are at fault, not the code. A hyperparameter search prunes such a trial."""

    def __init__(self, loss: float, step: int):
        super().__init__(f"loss became {loss} at step {step}; lower --train.lr or check the data")
        self.loss, self.step = loss, step


class TrainingInterrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after its checkpoint was safely written: not a mistake,
    so not an `LmforgeError`; the CLI says how to continue and exits 130."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}; continue with --resume")
        self.step, self.checkpoint = step, checkpoint
