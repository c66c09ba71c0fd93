"""When the client tries again: one RetryPolicy, used by every command that retries
(as urllib3's Retry), so that the numbers live in one place."""

from __future__ import annotations

import random
import time
from typing import Callable, NamedTuple, TypeVar

from .defaults import RETRIES
from .defaults import TIMEOUT as DEFAULT_TIMEOUT
from .errors import ConnectionFailed

_T = TypeVar("_T")


class Reconnecting(NamedTuple):
    """What Client.on_retry is told before the client reconnects after a cut."""

    attempt: int   # 1 for the first reconnect of a transfer
    retries: int   # the most it makes (--retries)
    delay: float   # seconds it waits before connecting again
    reason: str    # why the connection was lost



class RetryPolicy(NamedTuple):
    """When the client tries again: one policy for both of its retry loops (as urllib3's
    Retry), so their numbers live in one place.

    After a cut connection (a retryable ConnectionFailed): up to `reconnects` more
    attempts, waiting `backoff`, doubling, capped at `backoff_max`: 0.5 + 1 + 2 + 4 + 8 =
    15.5 s with the defaults, as --retries documents. While the server is busy: attempts
    for up to `busy_seconds` (the client's --timeout), waiting `busy_backoff`, doubling,
    capped at `busy_backoff_max`, each with jitter, so that clients refused together do
    not all return at the same instant. A server that closes before greeting us, without
    saying why, gets `closed_attempts` attempts: that is a plain client at a TLS port as
    often as a busy server, and the user should hear of it at once.
    """

    reconnects: int = RETRIES
    backoff: float = 0.5
    backoff_max: float = 8.0
    busy_seconds: float = DEFAULT_TIMEOUT
    busy_backoff: float = 0.25
    busy_backoff_max: float = 2.0
    closed_attempts: int = 4

    def reconnect_delay(self, retry: int) -> float:
        """Seconds before reconnection number `retry` (0 for the first)."""
        return min(self.backoff * 2 ** retry, self.backoff_max)

    def busy_delay(self, retry: int, left: float) -> float:
        """Seconds before busy retry number `retry`, with jitter (between half the
        exponential step and all of it), never past the `left` seconds of the budget."""
        step = min(self.busy_backoff * 2 ** retry, self.busy_backoff_max)
        return max(0.0, min(left, step * random.uniform(0.5, 1.0)))


    def run(self, attempt: Callable[[], _T],
            before_retry: Callable[[Reconnecting], None]) -> _T:
        """Run `attempt`; after a cut connection (a retryable ConnectionFailed) tell
        `before_retry`, wait, and run it again, up to `reconnects` times.

        Each attempt resumes where the last one stopped (the partials say where).
        """
        for retry in range(self.reconnects + 1):
            try:
                return attempt()
            except ConnectionFailed as exc:
                if not exc.retryable or retry == self.reconnects:
                    raise
                delay = self.reconnect_delay(retry)
                before_retry(Reconnecting(retry + 1, self.reconnects, delay, exc.message))
                time.sleep(delay)
        raise AssertionError("unreachable")
