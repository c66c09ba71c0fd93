"""Small local-file primitives both ends use: the pwrite loop, token files, name checks."""

from __future__ import annotations

import os

from .errors import ConfigError


def pwrite_all(fd: int, data: memoryview, position: int) -> None:
    """Write all of `data` at `position` (pwrite may write less than asked); OSError as is."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], position + done)


def read_tokens(path: str) -> tuple[bytes, ...]:
    """Secrets from a token file: one a line; blank lines and '#' comments ignored."""
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror}") from None
    tokens = tuple(t.strip() for t in lines if t.strip() and not t.strip().startswith(b"#"))
    if not tokens:
        raise ConfigError(f"token file {path} holds no token")
    return tokens


def is_utf8(name: str) -> bool:
    """False for a name on disk whose bytes are not UTF-8: Python carries them as
    surrogate escapes (os.fsdecode), which no JSON message can hold."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
