"""The entry of every command-line script: bad input ends in one error line, not a traceback."""
from __future__ import annotations

import sys
from typing import Any, Callable


def run_cli(prog: str, main: Callable[..., Any], *args: Any) -> None:
    """Call `main(*args)`; a FileNotFoundError or ValueError (a missing file, a bad flag value) exits
    with status 1 and `<prog>: error: <message>` on stderr."""
    try:
        main(*args)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"{prog}: error: {error}")
