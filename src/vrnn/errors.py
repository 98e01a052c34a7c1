"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class VRNNError(Exception):
    """Base class for every error caused by user input (files, names, options)."""


class DataError(VRNNError):
    """A data file or folder cannot be used; the message names the path and the problem."""


class CheckpointError(VRNNError):
    """A checkpoint cannot be loaded; the message names the file and the problem."""


class ConfigError(VRNNError):
    """An unknown model/dataset name or an inconsistent option."""
