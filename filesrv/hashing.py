"""Whole-file XXH3-128, as `xxh128sum` prints it."""

from __future__ import annotations

import os

import xxhash

from .errors import IoError

Hasher = xxhash.xxh3_128


def hash_fd_range(fd: int, start: int, end: int, hasher: Hasher, buffer: bytearray) -> None:
    """Feed bytes [start, end) of fd into hasher through a reused buffer."""
    view = memoryview(buffer)
    position = start
    while position < end:
        got = os.preadv(fd, [view[: min(len(view), end - position)]], position)
        if got == 0:
            raise IoError(f"file ended at {position} bytes, expected {end}")
        hasher.update(view[:got])
        position += got
