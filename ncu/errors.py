"""Errors about the user's input: the entry points print their one-line message and exit 2."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input (config, data, artifact, checkpoint); the message names the thing and the problem."""


class ConfigError(InputError):
    """An invalid configuration value; the message names the key and the problem."""


class ArtifactError(InputError):
    """A stored artifact (noise corruption, cache) that is unreadable or does not match its record."""


class CheckpointError(InputError):
    """A checkpoint that does not load or does not fit the configured model."""


class DataError(InputError):
    """Data that cannot make a run (no rows, a split smaller than one batch, an unreadable table)."""


class DivergedError(InputError):
    """Training produced a non-finite loss, features or weights (too high a learning rate, most often); the
    message names the stage, the step, the learning rate and the key to lower."""


class StorageError(InputError):
    """A file or folder that cannot be written (a full disk, a read-only or forbidden folder); the message
    names the path and the free space there."""
