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

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = [
    "DependencyError",
    "InputTypeError",
    "MissingFileError",
    "SlimkitError",
    "TrainingDiverged",
    "UsageError",
    "renamed_keyword",
]

F = TypeVar("F", bound=Callable[..., Any])


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


def renamed_keyword(old: str, new: str) -> Callable[[F], F]:
    """Decorator for a verb whose parameter ``old`` is now called ``new``: ``old=`` keeps working for one release,
    with a ``DeprecationWarning``; giving both is an ``InputTypeError``.

    Example:
        >>> @renamed_keyword("data", "train_data")
        ... def verb(model, train_data=None):
        ...     return train_data
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     verb("model", data=[1, 2])
        [1, 2]
        >>> print(caught[0].category.__name__, caught[0].message)
        DeprecationWarning verb(data=...) is deprecated and will be removed in the next release: call it train_data=...
    """

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            if old in kwargs:
                name = function.__name__
                if new in kwargs:
                    raise InputTypeError(f"{name}: give {new}= only ({old}= is its deprecated name)")
                warnings.warn(
                    f"{name}({old}=...) is deprecated and will be removed in the next release: call it {new}=...",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return cast(F, call)

    return decorate
