"""Socket I/O for the protocol: the edge where frames meet a real connection.

Shared by server and client.  Headers go through `protocol.FrameBuffer`; body
bytes are received straight into the caller's buffer (after draining whatever
the header read already pulled in), so large bodies are never copied twice.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Mapping

from .errors import BadRequest
from .protocol import FrameBuffer, encode_frame

_HEADER_READ = 64 * 1024


class PeerClosed(Exception):
    """The peer closed the connection cleanly between two frames."""


class TornFrame(BadRequest):
    """The connection ended in the middle of a frame (a header or a body).

    A BadRequest to the server, which cannot resync; the client treats it as the
    connection failure it is (the peer, or the network, cut it).
    """


class Channel:
    """One framed connection: send headers and bodies, receive headers and bodies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._frames = FrameBuffer()

    # -- sending
    def send_header(self, header: Mapping[str, Any]) -> None:
        self.sock.sendall(encode_frame(header))

    def send_frame(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def send_bytes(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    # -- receiving
    def read_header(self) -> dict[str, Any]:
        """The next header; PeerClosed on a clean EOF before it, TornFrame on a torn one."""
        while True:
            header = self._frames.next_header()
            if header is not None:
                return header
            data = self.sock.recv(_HEADER_READ)
            if not data:
                if self._frames.buffered:
                    raise TornFrame("connection closed in the middle of a header")
                raise PeerClosed()
            self._frames.feed(data)

    def read_body_into(self, view: memoryview) -> int:
        """Receive up to len(view) body bytes into view; at least one, or TornFrame at EOF."""
        if self._frames.buffered:
            chunk = self._frames.take_body(len(view))
            view[: len(chunk)] = chunk
            return len(chunk)
        got = self.sock.recv_into(view)
        if got == 0:
            raise TornFrame("connection closed in the middle of a body")
        return got

    def read_body(self, length: int) -> bytes:
        """A whole small body (listings) as bytes."""
        buf = bytearray(length)
        view = memoryview(buf)
        done = 0
        while done < length:
            done += self.read_body_into(view[done:])
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def send_file(sock: socket.socket, fd: int, offset: int, count: int) -> int:
    """Send `count` bytes of fd from `offset`, zero copy; how many went (fewer when the
    file shrank meanwhile). OSError as is: the caller knows what a failed send means."""
    if not count:
        return 0  # socket.sendfile takes a count of 0 as "up to the end of the file"
    with os.fdopen(fd, "rb", buffering=0, closefd=False) as fh:
        return sock.sendfile(fh, offset, count)


def format_address(address: tuple[Any, ...]) -> str:
    """(host, port, ...) as an address is written: host:port, or [v6 host]:port."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
