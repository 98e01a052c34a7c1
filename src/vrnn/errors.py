"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class VRNNError(Exception):
    """Base class for every error caused by user input (files, names, options)."""


class DataError(VRNNError):
    """A data file or folder cannot be used; the message names the path and the problem."""


class CheckpointError(VRNNError):
    """A checkpoint cannot be loaded; the message names the file and the problem."""


class ConfigError(VRNNError):
    """An unknown model/dataset name or an inconsistent option."""


class Interrupted(Exception):
    """A run stopped by a signal (SIGINT, SIGTERM) after saving what it could; the CLI
    prints the message as one line and exits 128 + the signal's number (130, 143)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
