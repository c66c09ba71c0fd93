"""Small local-file primitives both ends use: the pwrite loop, token files."""

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
