"""The filesrv client: a Python API over one connection, usable without the CLI.

    with Client("127.0.0.1", 8750) as c:
        c.put("big.iso", "isos/big.iso")
        c.get("isos/big.iso", "/tmp/big.iso")
        for entry in c.ls("isos"):
            print(entry.name, entry.size)

Client is the facade; each concern has its module, each layer built on the one below:
connection (open, TLS, auth, framing; retry: the RetryPolicy) <- commands (ls, stat,
hash, rm, mv, mkdir) <- transfer (get and put of one file) <- trees (put_tree,
get_tree). Local file state: local (partials, placement), sources (upload sources).
"""

from __future__ import annotations

from typing import Callable

from .connection import DEFAULT_PORT, parse_server
from .fileio import read_tokens
from .retry import DEFAULT_TIMEOUT, RETRIES, Reconnecting, RetryPolicy
from .sources import TreePlan, plan_local_tree, source_tag
from .transfer import (DEFAULT_BUFFER_SIZE, NO_CLOBBER, REPLACE, UPDATE, Progress,
                       RateLimiter, TransferResult)
from .trees import TreeTransfers

__all__ = ["Client", "TransferResult", "Reconnecting", "RetryPolicy", "RateLimiter",
           "Progress", "TreePlan", "plan_local_tree", "parse_server", "read_token_file",
           "source_tag", "REPLACE", "NO_CLOBBER", "UPDATE", "DEFAULT_PORT",
           "DEFAULT_TIMEOUT", "DEFAULT_BUFFER_SIZE", "RETRIES"]


def read_token_file(path: str) -> bytes:
    """The first non-blank, non-comment line of a token file."""
    return read_tokens(path)[0]



class Client(TreeTransfers):
    """One connection to a filesrv daemon; many commands may run over it."""

    def __init__(self, host: str, port: int = DEFAULT_PORT, *,
                 buffer_size: int = DEFAULT_BUFFER_SIZE, limit_rate: float | None = None,
                 timeout: float = DEFAULT_TIMEOUT, token: bytes | None = None,
                 tls: bool = False, cafile: str | None = None, durable: bool = False,
                 retries: int = RETRIES, retry: RetryPolicy | None = None,
                 on_retry: Callable[[Reconnecting], None] | None = None,
                 on_wait: Callable[[str], None] | None = None) -> None:
        """retry: the whole policy (default: `retries` reconnections, and a busy server
        waited for up to `timeout`); on_wait(message) hears, once, that the client is
        waiting for a busy server."""
        super().__init__(host, port, buffer_size=buffer_size, limit_rate=limit_rate,
                         durable=durable, timeout=timeout, token=token, tls=tls,
                         cafile=cafile, retries=retries, retry=retry, on_retry=on_retry,
                         on_wait=on_wait)
