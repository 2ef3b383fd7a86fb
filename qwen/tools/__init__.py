"""Command-line utilities (`python -m qwen.tools.<name> --help`)."""

import sys
from collections.abc import Callable

from ..loading import error_text


def run_cli_action(action: Callable[[], str]) -> int:
    """Run a tool's work: print its success message (exit 0), or a one-line `error:` for bad
    input (exit 2) instead of a traceback."""
    try:
        message = action()
    except (OSError, ValueError) as exc:  # missing, existing or unreadable paths; bad values
        print(f"error: {error_text(exc)}", file=sys.stderr)
        return 2
    print(message)
    return 0
