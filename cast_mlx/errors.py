"""The errors a run can end with and the exit codes of every command, in one table."""

from __future__ import annotations

EXIT_ERROR = 1  # a training error, a model or checkpoint that cannot be used
EXIT_USAGE = 2  # bad command-line or recipe input
EXIT_TIMEOUT = 3  # a data-parallel rank whose collective timed out
EXIT_DRIFT = 4  # system.stop_on_drift stopped the run
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}  # stopped by a signal: 128 + its number


class ConfigError(ValueError):
    """A recipe problem; the message is one line naming the field."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite steps, a failing reward function, ...)."""


class UsageError(ValueError):
    """Bad command-line input; reported as one line, exit status `EXIT_USAGE`."""
