"""The errors slimkit raises for bad input or a failed check, under one base class.

Every user-facing error is a ``SlimkitError``; the CLI prints it as one line and exits with code 2, while any
other exception is a bug and keeps its traceback. Each subclass also derives from the built-in exception it
replaces (``ValueError``, ``TypeError``, ...), so ``except ValueError`` keeps working.

Example:
    >>> from slimkit.errors import SlimkitError, UsageError
    >>> issubclass(UsageError, SlimkitError) and issubclass(UsageError, ValueError)
    True
"""

from __future__ import annotations

__all__ = ["DependencyError", "InputTypeError", "MissingFileError", "SlimkitError", "TrainingDiverged", "UsageError"]


class SlimkitError(Exception):
    """Base of every error slimkit raises on purpose; its message names the file, layer or field and what to do."""


class UsageError(SlimkitError, ValueError):
    """A bad value: a config field, a spec, a shape, an option."""


class InputTypeError(SlimkitError, TypeError):
    """An argument of the wrong type given to a slimkit verb."""


class MissingFileError(SlimkitError, FileNotFoundError):
    """A file or folder the caller named does not exist."""


class DependencyError(SlimkitError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""


class TrainingDiverged(SlimkitError, FloatingPointError):
    """Training produced a non-finite loss."""
