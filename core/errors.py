"""Every error the core raises on bad input. Messages say what went wrong and what to do about it.

Each class subclasses the standard exception a caller would naturally catch (ValueError, FileNotFoundError, ...)
so front ends can either catch `PruningError` for everything or the standard type for a category. `exit_code` is
what the command line exits with: 2 for bad input, 1 for a failure of the environment (no GPU, disk full, ...).
`describe_failure` turns the exceptions of other libraries that ordinary situations produce (a damaged weights
file, a full disk, a missing GPU) into the same kind of one-line message.
"""
from __future__ import annotations

import errno


class PruningError(Exception):
    """Base class of all errors raised by the core on user input."""

    exit_code = 2


class UnsupportedArchitectureError(PruningError, ValueError):
    """The model's family is not described by any architecture spec."""


class UnknownNameError(PruningError, KeyError):
    """A name (method, score, allocator, ...) is not in its registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidTargetError(PruningError, ValueError):
    """A ratio, width, parameter target or layer list that cannot be satisfied."""


class CalibrationError(PruningError, ValueError):
    """Calibration data is missing, unreadable or too short."""


class ModelLoadError(PruningError, OSError):
    """The model could not be found or loaded (not on disk while offline, pickle weights refused, ...)."""


class RecipeError(PruningError, ValueError):
    """A recipe file or recipe field is malformed."""


class OptionError(RecipeError):
    """A method option has the wrong type or is out of its range."""


class OutputExistsError(PruningError, FileExistsError):
    """The output folder already exists and overwriting was not asked for."""


class InsufficientMemoryError(PruningError, MemoryError):
    """A run would not fit in the memory of its device (refused before anything large is loaded; the message says
    how much it needs and what needs less)."""


class EnvironmentFailure(PruningError, OSError):
    """The machine cannot do what was asked: no such device, no space or no permission to write, no memory."""

    exit_code = 1


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; raised by the command line's signal handler so that `finally` blocks clean up.

    A BaseException (like KeyboardInterrupt) so that no `except Exception` swallows it.
    """

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(name)
        self.signum = signum
        self.name = name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)
_SPACE_TEXT = ("No space left", "File too large", "Disk quota")


def describe_failure(err: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for failures that ordinary use can run into; None for real bugs."""
    if isinstance(err, PruningError):
        return str(err), err.exit_code
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return ("Ran out of memory. Use a smaller model, fewer calibration samples (--calib-samples) or a smaller "
                "--batch-size, or a machine with more memory."), 1
    io = isinstance(err, OSError) or type(err).__name__ == "SafetensorError"
    if io and (getattr(err, "errno", None) in _SPACE or any(s in text for s in _SPACE_TEXT)):
        where = f" writing {err.filename}" if getattr(err, "filename", None) else ""
        return f"Ran out of disk space{where} ({text}). Free some space or choose another --out folder.", 1
    if isinstance(err, OSError) and err.errno in _PERMISSION:
        return (f"No permission to access {err.filename or 'a file'} ({err.strerror}). Check its permissions or "
                "choose another --out folder."), 1
    if type(err).__name__ == "SafetensorError" and "while serializing" in text:
        return f"Writing the weights failed ({text}). Check the --out folder's disk and permissions.", 1
    if type(err).__name__ == "SafetensorError":
        return (f"A weights file could not be read ({text}): it is damaged, truncated or not safetensors. "
                "Download the model again."), 2
    if isinstance(err, RuntimeError) and ("size mismatch" in str(err) or "ignore_mismatched_sizes" in str(err)):
        return ("The weights do not have the shapes the model's config.json describes: the folder mixes files of "
                "different models. Download the model again."), 2
    if isinstance(err, UnicodeDecodeError):
        return f"A text file is not UTF-8 ({err.reason} at byte {err.start}). Convert it to UTF-8.", 2
    return None


class DiskFullError(EnvironmentFailure):
    """The output does not fit on the disk (checked before each write, and reported when a write runs out)."""
