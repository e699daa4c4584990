"""Single keys from the terminal for `resiso top`: cbreak mode (keys arrive unbuffered and
unechoed, Ctrl-C still interrupts), put back as it was on the way out."""
from __future__ import annotations

import contextlib
import os
import termios
import tty
from typing import Iterator, Optional

QUIT = frozenset(b"qQ")


@contextlib.contextmanager
def cbreak(fd: Optional[int]) -> Iterator[None]:
    """cbreak mode on `fd` for the block; None (no terminal to read) does nothing."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield
    finally:
        # TCSADRAIN: whatever the view still writes lands before the echo comes back
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def quit_pressed(fd: int) -> bool:
    """Read the keys waiting on `fd` (call when it is readable); True if one quits. An
    end of input (the terminal went away) quits too."""
    data = os.read(fd, 64)
    return not data or any(b in QUIT for b in data)
