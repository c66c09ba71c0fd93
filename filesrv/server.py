"""The daemon: a ForkingTCPServer that owns the listening socket and the children
(slots, the bound on unauthenticated connections, drain on stop), and the handler of one
connection's lifecycle (TLS, greeting, hello, auth, the command loop, the one mapping of
what ends a command or a connection). The commands themselves are handlers.py's.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from . import __version__, defaults
from .daemonlog import describe, log
from .errors import (AuthFailed, BadRequest, Busy, ConfigError, FilesrvError, ServerError,
                     Superseded)
from .handlers import CloseConnection, Handlers, run_command
from .protocol import (Auth, Hello, check_version, encode_frame, error_reply, greeting, ok_reply,
                       Move, parse_request, proof_matches)
from .storage import TAKEOVER_SIGNAL, Storage
from .transport import Channel, PeerClosed, format_address

if TYPE_CHECKING:
    import ssl

# Not imported here: ssl (only a daemon with --tls-cert loads it) and dataclasses. Every
# MiB the daemon holds before it forks is paid again by every connection (page tables
# copied, pages copied on first write): ~0.1 ms per MiB on this machine kind.

DRAIN_SIGNAL = signal.SIGUSR2      # parent to child: finish the current command, then close
_KILL_AFTER_SECONDS = 3.0          # after the grace period, SIGTERM; this long later, SIGKILL
_AUTH_FAILURE_DELAY = 1.0          # slows down guessing; paid by the failing child only
_STALE_SWEEP_SECONDS = 3600.0      # how often the daemon looks for abandoned partials
HANDSHAKE_SHIELD_SECONDS = 0.5    # a handshake this young is never dropped for a newcomer


class ServerOptions(NamedTuple):
    """Everything `filesrv serve` can be told, with its defaults."""

    buffer_size: int = defaults.BUFFER_SIZE
    max_children: int = defaults.MAX_CHILDREN
    idle_timeout: float = defaults.IDLE_TIMEOUT
    handshake_timeout: float = defaults.HANDSHAKE_TIMEOUT
    grace: float = defaults.GRACE
    read_only: bool = False
    max_file_size: int | None = None
    partial_max_age: float = defaults.PARTIAL_MAX_AGE
    tokens: tuple[bytes, ...] = ()
    tls: ssl.SSLContext | None = None


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
    return context


def _is_tls_error(exc: OSError) -> bool:
    import ssl  # loaded already: the daemon has a TLS context
    return isinstance(exc, ssl.SSLError)


class _HandshakeTimeout(TimeoutError):
    pass


class ConnectionHandler(socketserver.BaseRequestHandler):
    """Serves one connection: TLS, greeting, hello, auth, then any number of commands."""

    server: "FilesrvServer"

    def setup(self) -> None:
        self.options = self.server.options
        self.peer = format_address(self.client_address)
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.settimeout(self.options.idle_timeout)
        # what the command handlers see of this connection (handlers.py)
        self.session = Handlers(self.server, self.request, self.options, self.peer)

    def handle(self) -> None:
        """The connection's life. Whatever ends it, from any frame in any phase, is
        mapped to one log line and at most one error reply by `_outcome`, never a traceback."""
        self.phase = "handshake"
        try:
            with _Deadline(self.options.handshake_timeout):
                self._start_tls()
                self.session.request = self.request  # the TLS wrapper, if any
                self.channel = self.session.channel = Channel(self.request)
                self._handshake()
            self.phase = "connection"
            while True:
                try:
                    header = self.channel.read_header()
                except PeerClosed:
                    return
                self._run(header)
                if self.server.draining:
                    return
        except (CloseConnection, PeerClosed):
            pass  # reported already, or a client that left between frames
        except Exception as exc:
            result, error = self._outcome(exc)
            self._log(self.phase, "-", 0, 0.0, result)
            if error is not None:
                self._send_error(error)

    def _outcome(self, exc: Exception) -> tuple[str, FilesrvError | None]:
        """How an exception that ends a command or a connection is logged, and the error
        reply the client gets (None: it cannot or need not be told)."""
        if isinstance(exc, CloseConnection):
            return str(exc) or "closed", None
        if isinstance(exc, PeerClosed):
            return "client closed the connection", None
        if isinstance(exc, FilesrvError):  # e.g. a torn or oversized frame: bad_request
            return exc.code, exc
        if isinstance(exc, _HandshakeTimeout):
            return str(exc), None
        if isinstance(exc, TimeoutError):
            return "timeout", None
        if isinstance(exc, OSError):
            if self.options.tls is not None and _is_tls_error(exc):
                return f"tls handshake failed: {getattr(exc, 'reason', None) or exc}", None
            return f"io: {exc.strerror or exc}", None
        # a bug (RecursionError, TypeError...): report it, keep the daemon, drop the connection
        return f"internal: {describe(exc)}", ServerError("internal server error")

    def finish(self) -> None:
        if self.options.tls is not None:  # the TLS wrapper is a second socket object
            self.request.close()

    def _start_tls(self) -> None:
        if self.options.tls is not None:
            self.request = self.options.tls.wrap_socket(self.request, server_side=True)

    def _handshake(self) -> None:
        nonce = os.urandom(32).hex() if self.options.tokens else None
        self.channel.send_header(greeting(f"filesrv/{__version__}", nonce))
        header = self.channel.read_header()
        if header.get("op") != Hello.op:  # before parsing: any other frame is bad_request
            raise BadRequest("the first request must be hello")
        request = parse_request(header)
        try:
            check_version(request)
        except FilesrvError as exc:
            self._log("hello", "-", 0, 0.0, exc.code)
            self._send_error(exc)
            raise CloseConnection() from None
        if nonce is None:
            self._handshake_succeeded()
        self.channel.send_header(greeting(f"filesrv/{__version__}", None))
        if nonce is not None:
            self._authenticate(nonce)

    def _handshake_succeeded(self) -> None:
        # before the reply that tells the client so: once it holds that reply, the
        # parent can already count this connection as authenticated
        _Deadline.end()
        self.server.report_authenticated()

    def _authenticate(self, nonce: str) -> None:
        header = self.channel.read_header()
        # any other frame in place of auth is a missing auth (PROTOCOL.md §2.3), unparsed
        request = parse_request(header) if header.get("op") == Auth.op else None
        proof = request.proof if isinstance(request, Auth) else None
        if proof_matches(list(self.options.tokens), nonce, proof):
            self._handshake_succeeded()
            self.channel.send_header(ok_reply())
            return
        why = "wrong token" if proof else "no token"
        log(f"{self.peer} auth - authentication failed ({why})")
        time.sleep(_AUTH_FAILURE_DELAY)
        self._send_error(AuthFailed("authentication failed: the server refused the "
                                    + ("token" if proof else "connection without a token")))
        raise CloseConnection()

    def _run(self, header: dict[str, Any]) -> None:
        started = time.monotonic()
        op = str(header.get("op", "?"))[:16]
        path: str | tuple[str, str] = str(header.get("path", "-"))[:200]
        if op == Move.op:  # a rename is logged with both of its paths
            path = (str(header.get("src", "-"))[:200], str(header.get("dst", "-"))[:200])
        session = self.session
        session.moved = 0

        def done(result: str) -> None:
            self._log(op, path, session.moved, time.monotonic() - started, result)

        self.server.in_command = True
        try:
            request = parse_request(header)
            run_command(session, request)  # the command table's policy, then its handler
        except Exception as exc:
            result, error = self._outcome(exc)
            done(result)
            if error is not None:
                self._send_error(error)
            if isinstance(exc, FilesrvError):
                return  # refused cleanly: the connection stays in sync
            raise CloseConnection() from None
        finally:
            self.server.in_command = False
        done("ok")

    # -- helpers

    def _send_error(self, error: FilesrvError) -> None:
        self.session._send_error(error)

    def _log(self, op: str, path: str | tuple[str, str], moved: int, seconds: float,
             result: str) -> None:
        shown = " -> ".join(map(repr, path)) if isinstance(path, tuple) else repr(path)
        log(f"{self.peer} {op} {shown} bytes={moved} {seconds:.3f}s {result}")


class _Deadline:
    """A hard limit on the handshake of a child (SIGALRM: the child has one thread).

    The same signal, sent by the parent before the timer runs out, drops a connection
    that has not authenticated yet to make room for a newer one (FilesrvServer._make_room);
    once the handshake has succeeded, the signal does nothing.
    """

    armed = False  # per process: only a child in its handshake is ever armed

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        # the SIGALRM handler (expired) is installed once, in the parent, before any fork
        _Deadline.armed = True
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: Any) -> None:
        self.end()

    @staticmethod
    def end() -> None:
        _Deadline.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)

    @staticmethod
    def expired(signum: int, frame: Any) -> None:
        if not _Deadline.armed:
            return  # past the handshake (or the parent): nothing to cut short
        if signal.getitimer(signal.ITIMER_REAL)[0] > 0:  # time was left: the parent's doing
            raise _HandshakeTimeout("dropped: the oldest of too many unauthenticated "
                                    "connections")
        raise _HandshakeTimeout("timeout")


class FilesrvServer(socketserver.ForkingTCPServer):
    """Forks one child per connection; the accept loop never waits for children."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], storage: Storage,
                 options: ServerOptions = ServerOptions()) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.storage = storage
        self.options = options
        self.max_children = options.max_children
        self.active_children: set[int] = set()
        # Children that have not authenticated yet (pid -> when it was forked), oldest
        # first, and those among them told to go. A child reports its authentication
        # through a pipe (its pid, one atomic write); a child that dies is forgotten when
        # it is reaped, so nothing leaks.
        self.unauthenticated: dict[int, float] = {}
        self.dropping: set[int] = set()
        self.unauthenticated_limit = max(1, options.max_children // 2)
        self._authenticated_r, self._authenticated_w = os.pipe()
        os.set_blocking(self._authenticated_r, False)
        os.set_blocking(self._authenticated_w, False)  # a child never waits on the parent
        self.hurry = threading.Event()  # a second stop signal: skip the grace period
        self._last_sweep = 0.0
        # per-child state (each child has its own copy after fork)
        self._abortable = False
        self.in_command = False
        self.draining = False
        self.is_child = False
        super().__init__(address, ConnectionHandler)
        # Installed here, once, and inherited by every fork: a child pays nothing for
        # them and cannot be killed by a signal that arrives before it could install
        # them. In the parent they do nothing.
        signal.signal(TAKEOVER_SIGNAL, self._on_takeover)
        signal.signal(DRAIN_SIGNAL, self._on_drain)
        signal.signal(signal.SIGALRM, _Deadline.expired)

    # -- children: never block the accept loop on them

    def collect_children(self, *, blocking: bool = False) -> None:
        for pid in list(self.active_children):
            try:
                done, _ = os.waitpid(pid, 0 if blocking else os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.active_children.discard(pid)
                self.unauthenticated.pop(pid, None)
                self.dropping.discard(pid)
        # After reaping: a report from a child reaped just now is read (and ignored) here,
        # before its pid can be given to a new child.
        self._read_authenticated()

    def _read_authenticated(self) -> None:
        while True:
            try:
                reports = os.read(self._authenticated_r, 4096)
            except BlockingIOError:
                return
            if not reports:
                return
            for (pid,) in struct.iter_unpack("=i", reports):  # 4-byte writes: whole
                self.unauthenticated.pop(pid, None)
                self.dropping.discard(pid)

    def report_authenticated(self) -> None:
        """In a child: tell the parent this connection is past its handshake."""
        try:
            os.write(self._authenticated_w, struct.pack("=i", os.getpid()))
        except OSError:
            pass  # pipe full (the parent is far behind): counted as unauthenticated

    def service_actions(self) -> None:
        self.collect_children()
        now = time.monotonic()
        if now - self._last_sweep >= _STALE_SWEEP_SECONDS or not self._last_sweep:
            self._last_sweep = now
            for name in self.storage.remove_stale_partials(self.options.partial_max_age):
                log(f"removed stale partial upload {name}")
            self.storage.empty_trash()
            self.storage.prune_digests()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        self.collect_children()
        if not self._make_room():
            self._refuse_busy(request, client_address)
            return
        before = set(self.active_children)
        super().process_request(request, client_address)
        forked_at = time.monotonic()
        for pid in self.active_children - before:  # the child just forked
            self.unauthenticated[pid] = forked_at

    def _make_room(self) -> bool:
        """Whether a new connection may have a child; False when every slot holds an
        authenticated connection.

        Connections that have not authenticated yet hold at most half of the slots
        (`unauthenticated_limit`). At that bound, or when every slot is taken, the oldest
        of them is dropped to make room: a client that has the token needs only a few
        round trips to authenticate, while silent sockets would otherwise hold their
        slots for the whole handshake timeout. A connection younger than
        HANDSHAKE_SHIELD_SECONDS is never dropped (the newcomer is refused as busy
        instead, and its client waits and retries): a flood of short connections must
        not cut a real client off in the middle of its handshake.
        """
        waiting = [pid for pid in self.unauthenticated if pid not in self.dropping]
        in_use = len(self.active_children) - len(self.dropping)
        if in_use < self.max_children and len(waiting) < self.unauthenticated_limit:
            return True
        if not waiting:
            return False
        oldest = waiting[0]
        if time.monotonic() - self.unauthenticated[oldest] < HANDSHAKE_SHIELD_SECONDS:
            return False
        self.dropping.add(oldest)  # its slot counts as free from now on
        try:
            os.kill(oldest, signal.SIGALRM)  # its handshake ends (see _Deadline)
        except ProcessLookupError:
            pass
        return True

    def _refuse_busy(self, request: socket.socket, client_address: Any) -> None:
        # With TLS an error message would need a handshake, which must not run in the
        # accept loop: the connection is just closed, and the client retries as for busy.
        if self.options.tls is None:
            error = Busy(f"server busy: {self.max_children} connections in use, "
                         "try again shortly")
            try:
                request.setblocking(False)
                request.send(encode_frame(error_reply(error)))
                while request.recv(65536):  # what the client already sent, so no RST
                    pass
            except OSError:
                pass
        log(f"{format_address(client_address)} connect - bytes=0 0.000s busy")
        self.shutdown_request(request)

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        # In the child: die on SIGTERM; leave SIGINT (a terminal's Ctrl-C reaches the
        # whole process group) to the parent, which drains the children gracefully.
        self.is_child = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Only the parent listens: a child holding the socket would keep the port bound
        # after the parent dies (a restart fails, new clients queue for nobody) and keep
        # it open while the parent drains (new clients hang instead of being refused).
        self.socket.close()
        os.close(self._authenticated_r)
        super().finish_request(request, client_address)

    def _on_takeover(self, signum: int, frame: Any) -> None:
        if self.is_child and self._abortable:
            raise Superseded("a newer connection took over this upload")

    def _on_drain(self, signum: int, frame: Any) -> None:
        if not self.is_child:
            return
        self.draining = True
        if not self.in_command:
            raise CloseConnection("shutting down")

    def abortable(self) -> "_Abortable":
        return _Abortable(self)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # one log line, never a traceback on stderr (socketserver's default prints one)
        exc = sys.exc_info()[1]
        if exc is None or isinstance(exc, (Superseded, CloseConnection)):
            return  # already reported by the handler
        log(f"{format_address(client_address)} connection - internal: {describe(exc)}")

    # -- stopping

    def stop_children(self) -> None:
        """Let commands in flight finish for up to the grace period, then stop the rest.

        Stopped uploads keep their partials, so they resume on the next attempt.
        """
        self._signal_children(DRAIN_SIGNAL)
        self._wait_for_children(self.options.grace, self.hurry)
        if self.active_children:
            log(f"grace period over: stopping {len(self.active_children)} connection(s)")
            self._signal_children(signal.SIGTERM)
            self._wait_for_children(_KILL_AFTER_SECONDS, None)
            self._signal_children(signal.SIGKILL)
        self.collect_children(blocking=True)

    def _signal_children(self, signum: int) -> None:
        for pid in list(self.active_children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _wait_for_children(self, seconds: float, interrupt: threading.Event | None) -> None:
        deadline = time.monotonic() + seconds
        while self.active_children and time.monotonic() < deadline:
            if interrupt is not None and interrupt.is_set():
                return
            self.collect_children()
            time.sleep(0.02)

    def server_close(self) -> None:
        socketserver.TCPServer.server_close(self)  # stop accepting first
        self.stop_children()


class _Abortable:
    """While inside, a takeover signal aborts the upload (never during placement)."""

    def __init__(self, server: FilesrvServer) -> None:
        self.server = server

    def __enter__(self) -> None:
        self.server._abortable = True

    def __exit__(self, *exc: Any) -> None:
        self.server._abortable = False


def _open_root(root: str, options: ServerOptions) -> Storage:
    """The served root, or a ConfigError that says why it cannot be served."""
    try:
        return Storage(root, buffer_size=options.buffer_size)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"cannot serve {root}: it (or a directory above it) is not a "
                          "directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot serve {root}: {exc.strerror or exc}") from None


def _listen(host: str, port: int, storage: Storage, options: ServerOptions) -> FilesrvServer:
    """The bound, listening server, or a ConfigError (port in use or out of range, a host
    that does not resolve or is not this machine's)."""
    try:
        return FilesrvServer((host, port), storage, options)
    except OverflowError:  # from bind(): the port is outside 0-65535
        raise ConfigError(f"cannot listen on port {port}: a port is 0 to 65535") from None
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ConfigError(f"cannot listen on {format_address((host, port))}: {why}") from None


def serve(root: str, host: str, port: int, options: ServerOptions = ServerOptions()) -> int:
    """Run the daemon in the foreground until SIGTERM or SIGINT; returns the exit status."""
    storage = _open_root(root, options)
    server = _listen(host, port, storage, options)
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stopping.is_set():
            server.hurry.set()
            return
        stopping.set()
        # shutdown() waits for serve_forever, so it cannot run in this thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    shown = format_address(server.server_address)
    if not options.tokens:
        may = "read" if options.read_only else "read and write"
        log(f"no --token-file: every client that can connect may {may} the root")
    if options.tls is None:
        log("no TLS: traffic, file contents included, crosses the network in the clear")
    if options.read_only:
        log("read-only: uploads, rm, mv and mkdir are refused")
    print(f"filesrv {__version__} listening on {shown} (root {storage.root})", flush=True)
    # Children start warm: everything imported, and the objects that exist now moved
    # out of the collector's reach, so a child's first collection does not touch (and
    # copy) every page it inherited.
    if options.tokens:
        import hashlib, hmac  # noqa: E401,F401  (used by every authenticating child)
    gc.freeze()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        log(f"stopping: finishing transfers in flight (grace {options.grace:g} s)")
        server.server_close()
    log("stopped")
    return 0
