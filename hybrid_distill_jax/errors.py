"""Errors that carry a one-line, user-facing message."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what to change."""


class DataError(ValueError):
    """Input data is missing, corrupt or too small; the message names the file or dataset."""


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into; the message lists the mismatches."""
