"""The daemon's log: one line per event on stderr, never forged by a client, never fatal."""

from __future__ import annotations

import os
import re
import time


# Anything a client sent may reach the log: these never reach it raw, so a request can never
# end a line and forge one of its own (C0 and C1 controls, DEL, line and paragraph
# separators, bidirectional overrides).
_UNPRINTABLE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_LOG_FD = 2
_unwritten_lines = 0  # log lines this process could not write (each process its own count)


def _escape(text: str) -> str:
    return _UNPRINTABLE_RE.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def log(message: str) -> None:
    """Write one line to stderr, control characters escaped; never raises.

    The service never depends on its log: a line that cannot be written (the reader of a
    log pipe went away, the log's disk is full, EIO) is dropped and counted, and the count
    is reported by the next line that can be written.
    """
    global _unwritten_lines
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # UTC, ISO 8601
    line = f"{stamp} {_escape(message)}\n"
    if _unwritten_lines:
        line = f"{stamp} ({_unwritten_lines} earlier log line(s) could not be written)\n" + line
    try:
        _write_all(line.encode("utf-8", "backslashreplace"))
    except OSError:
        _unwritten_lines += 1
    else:
        _unwritten_lines = 0


def _write_all(data: bytes) -> None:
    # straight to the descriptor, one write per line where the OS allows: lines from
    # concurrent children never interleave, and nothing stays buffered after a failure
    view = memoryview(data)
    while view:
        written = os.write(_LOG_FD, view)
        if not written:
            raise OSError("the log accepts no bytes")
        view = view[written:]


def describe(exc: BaseException) -> str:
    """An unexpected exception in one line: its repr and where it was raised."""
    import traceback  # only on the path of a bug
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {str(exc)[:200]}{where}"
