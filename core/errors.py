"""The errors a user can cause, one class per kind; torch-free, so the launcher can use them.

Each is reported as one `error: ...` line and exit code 2 (train_ddp.report_error, and
cli.run_command for the other commands), never a traceback: the message says what is wrong and
how to fix it.
"""


class UsageError(ValueError):
    """Bad flags or inputs of a command other than training (predict.py, export.py, ...)."""


class ConfigError(ValueError):
    """Flag values that cannot work; the message names the flag and what it accepts."""


class DataError(ValueError):
    """A dataset that cannot be used as given; the message says what is wrong and how to fix it."""


class ModelError(ValueError):
    """A model that cannot be built as asked (unknown name, missing or mismatched weights)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or resumed; the message names the file and the fix."""


class TrainingError(RuntimeError):
    """Training cannot usefully go on (e.g. the loss keeps being NaN); the message says why."""


USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, TrainingError)


def first_line(exc):
    """An exception's first message line, or its type name when it has no message (EOFError)."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
