"""The daemon: a ForkingTCPServer that owns the listening socket and the children,
and a handler that owns one connection.
"""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import sys
import threading
import time
from typing import Any, Callable

from . import __version__
from .errors import BadRange, BadRequest, Busy, FilesrvError, ServerError, Superseded
from .protocol import (PROTOCOL_VERSION, Commit, Data, Get, Hello, ListDir, Put,
                       check_version, encode_frame, encode_listing, error_reply, ok_reply,
                       parse_path, parse_request)
from .storage import TAKEOVER_SIGNAL, PartialUpload, Storage
from .transport import Channel, PeerClosed

DEFAULT_BUFFER_SIZE = 1024 * 1024
DEFAULT_MAX_CHILDREN = 64
DEFAULT_IDLE_TIMEOUT = 300.0
_DRAIN_SECONDS = 2.0  # after an error mid-body, how long we read on so the client sees it
_REAP_SECONDS = 5.0   # at shutdown, how long children get to exit on SIGTERM


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{stamp} {message}", file=sys.stderr, flush=True)


_GREETING = ok_reply(version=PROTOCOL_VERSION, server=f"filesrv/{__version__}")


class _CloseConnection(Exception):
    """The connection cannot continue (framing lost, or an error mid-body)."""


class ConnectionHandler(socketserver.BaseRequestHandler):
    """Serves one connection: greeting, hello, then any number of commands."""

    server: "FilesrvServer"

    def setup(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.settimeout(self.server.idle_timeout)
        self.channel = Channel(self.request)
        self.peer = _format_address(self.client_address)
        self.buffer = bytearray(self.server.buffer_size)

    def handle(self) -> None:
        try:
            self.channel.send_header(_GREETING)
            self._handshake()
            while True:
                try:
                    header = self.channel.read_header()
                except PeerClosed:
                    return
                self._run(header)
        except _CloseConnection:
            pass
        except PeerClosed:
            pass
        except BadRequest as exc:  # torn or oversized frame: we cannot resync
            self._log("frame", "-", 0, 0.0, exc.code)
            self._send_error(exc)
        except (TimeoutError, socket.timeout):
            self._log("idle", "-", 0, 0.0, "timeout")
        except OSError as exc:
            self._log("connection", "-", 0, 0.0, f"io: {exc.strerror or exc}")

    def _handshake(self) -> None:
        request = parse_request(self.channel.read_header())
        if not isinstance(request, Hello):
            raise BadRequest("the first request must be hello")
        try:
            check_version(request)
        except FilesrvError as exc:
            self._send_error(exc)
            raise _CloseConnection() from None
        self.channel.send_header(_GREETING)

    def _run(self, header: dict[str, Any]) -> None:
        started = time.monotonic()
        op = str(header.get("op", "?"))[:16]
        path = str(header.get("path", "-"))[:200]
        self.moved = 0
        try:
            request = parse_request(header)
            handler = self._dispatch.get(type(request))
            if handler is None:
                raise BadRequest(f"{request.op!r} is not valid here")
            handler(self, request)
        except _CloseConnection as exc:
            self._log(op, path, self.moved, time.monotonic() - started, str(exc) or "closed")
            raise
        except FilesrvError as exc:  # refused cleanly: the connection stays in sync
            self._log(op, path, self.moved, time.monotonic() - started, exc.code)
            self._send_error(exc)
            return
        except OSError as exc:  # the connection broke or went idle mid-command
            result = "timeout" if isinstance(exc, TimeoutError) else f"io: {exc}"
            self._log(op, path, self.moved, time.monotonic() - started, result)
            raise _CloseConnection() from None
        except Exception as exc:  # a bug: report it, keep the daemon, drop this connection
            self._log(op, path, self.moved, time.monotonic() - started, f"internal: {exc!r}")
            self._send_error(ServerError("internal server error"))
            raise _CloseConnection() from exc
        self._log(op, path, self.moved, time.monotonic() - started, "ok")

    # -- commands

    def _ls(self, request: ListDir) -> None:
        entries = self.server.storage.list_dir(parse_path(request.path, allow_root=True))
        body = encode_listing(entries)
        self.channel.send_header(ok_reply(length=len(body), count=len(entries)))
        self.channel.send_bytes(body)
        self.moved = len(body)

    def _get(self, request: Get) -> None:
        storage = self.server.storage
        f = storage.open_for_read(parse_path(request.path))
        try:
            offset = request.offset
            if request.if_match is not None and request.if_match != f.etag:
                offset = 0  # the file changed since the first attempt: never splice
            if offset > f.size:
                raise BadRange(f"offset {offset} is beyond the end ({f.size} bytes)")
            length = f.size - offset
            self.channel.send_header(ok_reply(size=f.size, offset=offset, length=length,
                                              etag=f.etag, xxh128=storage.digest_of(f)))
            self._send_file(f.fd, offset, length)
        finally:
            f.close()

    def _send_file(self, fd: int, offset: int, length: int) -> None:
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as fh:
            try:
                sent = self.request.sendfile(fh, offset, length) if length else 0
            except OSError as exc:
                raise _CloseConnection(f"send failed: {exc.strerror or exc}") from None
        self.moved = sent
        if sent != length:  # the file shrank under us; the body can no longer be framed
            raise _CloseConnection("file shrank while it was sent")

    def _put(self, request: Put) -> None:
        parts = parse_path(request.path)
        upload = self.server.storage.begin_upload(parts, request.size, request.source)
        in_sync = False  # False while the client may be sending body bytes
        try:
            self.channel.send_header(ok_reply(offset=upload.resume_offset))
            data = self._expect(Data)
            if data.length != request.size - upload.resume_offset:
                raise BadRequest(f"data length {data.length} != size - offset "
                                 f"({request.size - upload.resume_offset})")
            self._receive_into(upload, data.length)
            commit = self._expect(Commit)
            in_sync = True
            digest = upload.commit(commit.xxh128)
            self.channel.send_header(ok_reply(size=request.size, xxh128=digest))
        except FilesrvError as exc:
            upload.close()  # let a retry take the partial while we report
            if in_sync:
                raise
            self._fail_mid_body(exc)
        finally:
            upload.close()

    def _receive_into(self, upload: PartialUpload, length: int) -> None:
        view = memoryview(self.buffer)
        remaining = length
        with self.server.abortable():
            while remaining:
                got = self.channel.read_body_into(view[: min(len(view), remaining)])
                upload.write(view[:got])
                remaining -= got
                self.moved += got

    def _expect(self, kind: type) -> Any:
        request = parse_request(self.channel.read_header())
        if not isinstance(request, kind):
            raise BadRequest(f"expected {kind.op!r}, got {request.op!r}")
        return request

    def _fail_mid_body(self, error: FilesrvError) -> None:
        """Report an error while the client may still be sending, then close."""
        self._send_error(error)
        if isinstance(error, Superseded):  # its client is gone or stalled: nobody to drain
            raise _CloseConnection(error.code)
        try:
            self.request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _DRAIN_SECONDS
            self.request.settimeout(_DRAIN_SECONDS)
            while time.monotonic() < deadline and self.request.recv_into(self.buffer):
                pass
        except OSError:
            pass
        raise _CloseConnection(error.code)

    _dispatch: dict[type, Callable[["ConnectionHandler", Any], None]] = {
        ListDir: _ls, Get: _get, Put: _put,
    }

    # -- helpers

    def _send_error(self, error: FilesrvError) -> None:
        try:
            self.channel.send_header(error_reply(error))
        except OSError:
            pass

    def _log(self, op: str, path: str, moved: int, seconds: float, result: str) -> None:
        log(f"{self.peer} {op} {path!r} bytes={moved} {seconds:.3f}s {result}")


class FilesrvServer(socketserver.ForkingTCPServer):
    """Forks one child per connection; the accept loop never waits for children."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], storage: Storage, *,
                 buffer_size: int = DEFAULT_BUFFER_SIZE,
                 max_children: int = DEFAULT_MAX_CHILDREN,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.storage = storage
        self.buffer_size = buffer_size
        self.max_children = max_children
        self.idle_timeout = idle_timeout
        self.active_children: set[int] = set()
        self._abortable = False
        super().__init__(address, ConnectionHandler)

    # -- children: never block the accept loop on them

    def collect_children(self, *, blocking: bool = False) -> None:
        for pid in list(self.active_children):
            try:
                done, _ = os.waitpid(pid, 0 if blocking else os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.active_children.discard(pid)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        self.collect_children()
        if len(self.active_children) >= self.max_children:
            self._refuse_busy(request, client_address)
            return
        super().process_request(request, client_address)

    def _refuse_busy(self, request: socket.socket, client_address: Any) -> None:
        error = Busy(f"server busy: {self.max_children} connections in use, try again shortly")
        try:
            request.settimeout(1.0)
            request.sendall(encode_frame(error_reply(error)))
        except OSError:
            pass
        log(f"{_format_address(client_address)} connect - bytes=0 0.000s busy")
        self.shutdown_request(request)

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        # In the child: die on the signals that stop the daemon, and let a newer
        # upload of the same file take over from this one.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(TAKEOVER_SIGNAL, self._on_takeover)
        super().finish_request(request, client_address)

    def _on_takeover(self, signum: int, frame: Any) -> None:
        if self._abortable:
            raise Superseded("a newer connection took over this upload")

    def abortable(self) -> "_Abortable":
        return _Abortable(self)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, Superseded):
            log(f"{_format_address(client_address)} put - superseded by a newer connection")
            return
        super().handle_error(request, client_address)

    def stop_children(self) -> None:
        """SIGTERM every child (their partials stay resumable) and reap them all."""
        for pid in list(self.active_children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + _REAP_SECONDS
        while self.active_children and time.monotonic() < deadline:
            self.collect_children()
            time.sleep(0.02)
        for pid in list(self.active_children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.collect_children(blocking=True)

    def server_close(self) -> None:
        socketserver.TCPServer.server_close(self)
        self.stop_children()


class _Abortable:
    """While inside, a takeover signal aborts the upload (never during placement)."""

    def __init__(self, server: FilesrvServer) -> None:
        self.server = server

    def __enter__(self) -> None:
        self.server._abortable = True

    def __exit__(self, *exc: Any) -> None:
        self.server._abortable = False


def _format_address(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(root: str, host: str, port: int, *, buffer_size: int = DEFAULT_BUFFER_SIZE,
          max_children: int = DEFAULT_MAX_CHILDREN,
          idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> int:
    """Run the daemon in the foreground until SIGTERM or SIGINT; returns the exit status."""
    storage = Storage(root, buffer_size=buffer_size)
    server = FilesrvServer((host, port), storage, buffer_size=buffer_size,
                           max_children=max_children, idle_timeout=idle_timeout)

    def on_signal(signum: int, frame: Any) -> None:
        # shutdown() waits for serve_forever, so it cannot run in this thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    print(f"filesrv {__version__} listening on {shown} (root {storage.root})", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    log("stopped")
    return 0
