"""The entry of every command-line script: bad input ends in one error line, not a traceback."""
from __future__ import annotations

import sys
from typing import Any, Callable

# Set by `inputs_checked()`: from then on a ValueError or FileNotFoundError is a fault of the run itself.
_inputs_checked = False


def inputs_checked() -> None:
    """Declare that every input of the running script has been checked and the work begins: errors
    raised after this keep their traceback under `run_cli` (a ValueError at update 15,000 is a bug
    or a data fault to debug, not a bad flag)."""
    global _inputs_checked
    _inputs_checked = True


def run_cli(prog: str, main: Callable[..., Any], *args: Any) -> None:
    """Call `main(*args)`; a FileNotFoundError or ValueError raised before `main` calls `inputs_checked()`
    (a missing file, a bad flag value) exits with status 1 and `<prog>: error: <message>` on stderr."""
    global _inputs_checked
    _inputs_checked = False
    try:
        main(*args)
    except (FileNotFoundError, ValueError) as error:
        if _inputs_checked:
            raise
        sys.exit(f"{prog}: error: {error}")
