"""Small local-file primitives both ends use."""

from __future__ import annotations

import os


def pwrite_all(fd: int, data: memoryview, position: int) -> None:
    """Write all of `data` at `position` (pwrite may write less than asked); OSError as is."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], position + done)
