"""Every exception the program turns into an exit status, each with a one-line, user-facing message.

``main`` maps them to exit statuses: ConfigError, DataError and CheckpointError -> 2,
NonFiniteError -> 3, Preempted -> 75 (docs/ERRORS.md).
"""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what to change."""


class DataError(ValueError):
    """Input data is missing, corrupt or too small; the message names the file or dataset."""


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into; the message lists the mismatches."""


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient under ``nonfinite_policy='stop'``."""

    exit_code = 3


class Preempted(Exception):
    """SIGTERM (or a multi-host preemption notice) arrived; a checkpoint was written at ``step``."""

    exit_code = 75  # EX_TEMPFAIL: try again later (rerun the same command to resume)

    def __init__(self, step: int, directory: str):
        super().__init__(f"preempted: checkpoint written at step {step} in {directory}; rerun to resume")
        self.step = step
