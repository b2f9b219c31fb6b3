import sys
from collections.abc import Callable


class LacunaError(Exception):
    """A user-facing error: its message is one line naming the problem and the fix."""


def first_line(error: BaseException, last: bool = False, limit: int = 200) -> str:
    """One line of an exception's message for a one-line error (the last line with `last`), or its type's name."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[-1 if last else 0][:limit]


def run_main(function: Callable[[list[str]], object], arguments: list[str]) -> None:
    """Run an entry point: a LacunaError becomes one line on stderr and exit code 2 (`--debug`: traceback)."""
    debug = "--debug" in arguments
    try:
        function([argument for argument in arguments if argument != "--debug"])
    except LacunaError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
