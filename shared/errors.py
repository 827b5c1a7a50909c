"""User-facing errors and the command-line wrapper that turns them into one-line messages."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix, on one line.

    A subclass of ValueError so the public API raises ValueError, as DESIGN.md promises.
    """


class TrainingStopped(RuntimeError):
    """Training stopped for a reason that is not a bug (a non-finite loss, say); the message says why."""


class UploadFailed(RuntimeError):
    """An upload to the Hub failed after the model was saved locally; the message says where it is and how
    to retry."""


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a command's `main`, turning UserError into `error: ...` on stderr and exit code 2.

    TrainingStopped and UploadFailed give exit code 1 with their one-line message. Anything else is a
    bug and keeps its traceback.
    """
    try:
        main(argv)
    except UserError as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"stopped: {one_line(str(error))}", file=sys.stderr)
        return 1
    except UploadFailed as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        return 1
    return 0


def one_line(message: str) -> str:
    return " ".join(message.split())


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def is_out_of_memory(error: BaseException) -> bool:
    """True for allocation failures on any device, also when a loader worker hit one or was killed for it."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("can't allocate memory", "out of memory", "not enough memory",
                                      "killed by signal: Killed", "Cannot allocate memory"))
