"""How a dtrain command's process ends."""

from __future__ import annotations

import gc
import sys
from typing import NoReturn


def exit_with(code: int) -> NoReturn:
    """`sys.exit(code)`, with every live object frozen out of the garbage collector first: the interpreter's
    final collections then skip the object graph torch, transformers and the run built, which they would
    only walk to free memory the process is about to give back (measured on the 2-core machine: 4.1 s of a
    2-step smoke run's exit, 0.6 s frozen). Files are still closed, atexit handlers and destructors still
    run. For a command's process only: a long-lived caller would keep its frozen garbage."""
    gc.freeze()
    sys.exit(code)
