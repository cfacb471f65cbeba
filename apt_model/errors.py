"""The errors of apt_model: a family under ``aptbundle.AptBundleError``, so every program of the
project turns them into one line on stderr and exit status 1 by the same rule."""

from __future__ import annotations

from aptbundle import AptBundleError


class APTError(AptBundleError):
    """Base of every error apt_model raises for a problem with the user's input or data."""


class ConfigError(APTError):
    """A config value is out of range or of the wrong type."""


class DataError(APTError):
    """The corpus is missing, unreadable, too short, or not the one the run was trained on."""


class TrainingError(APTError):
    """Training cannot start or continue as asked (bad flags, wrong device, busy run)."""
