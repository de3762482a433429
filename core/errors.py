"""Every error the core raises on bad input. Messages say what went wrong and what to do about it.

Each class subclasses the standard exception a caller would naturally catch (ValueError, FileNotFoundError, ...)
so front ends can either catch `PruningError` for everything or the standard type for a category.
"""
from __future__ import annotations


class PruningError(Exception):
    """Base class of all errors raised by the core on user input."""


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


class OutputExistsError(PruningError, FileExistsError):
    """The output folder already exists and overwriting was not asked for."""


class InsufficientMemoryError(PruningError, MemoryError):
    """A run would not fit in the memory of its device (the message says how much it needs)."""
