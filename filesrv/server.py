"""The daemon: a ForkingTCPServer that owns the listening socket and the children,
and a handler that owns one connection.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import re
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, NoReturn

from . import __version__, defaults
from .errors import (AuthFailed, BadRange, BadRequest, Busy, ConfigError, FilesrvError,
                     IntegrityError, NotADirectory, ReadOnly, ServerError, Superseded,
                     TooLarge)
from .protocol import (Auth, Commit, Data, Get, GetFiles, Hello, ListDir, MakeDir, Move, Put,
                       PutFiles, Remove, Stat, check_version,
                       encode_array, encode_chunks, encode_frame, error_reply, greeting,
                       ok_reply, parse_path, parse_request, placed_reply, proof_matches)
from .storage import TAKEOVER_SIGNAL, PartialUpload, ReadableFile, Storage
from .transport import Channel, PeerClosed, format_address, send_file

if TYPE_CHECKING:
    import ssl

# Not imported here: ssl (only a daemon with --tls-cert loads it) and dataclasses. Every
# MiB the daemon holds before it forks is paid again by every connection (page tables
# copied, pages copied on first write): ~0.1 ms per MiB on this machine kind.

DRAIN_SIGNAL = signal.SIGUSR2      # parent to child: finish the current command, then close
_ERROR_DRAIN_SECONDS = 2.0         # after an error mid-body, read on so the client sees it
_KILL_AFTER_SECONDS = 3.0          # after the grace period, SIGTERM; this long later, SIGKILL
_AUTH_FAILURE_DELAY = 1.0          # slows down guessing; paid by the failing child only
_STALE_SWEEP_SECONDS = 3600.0      # how often the daemon looks for abandoned partials
HANDSHAKE_SHIELD_SECONDS = 0.5    # a handshake this young is never dropped for a newcomer
_INLINE_BODY = 64 * 1024           # get bodies up to this size go out with their header
_BATCH_SEND_BYTES = 256 * 1024     # get_files gathers small files into sends of this size
_LISTING_IN_MEMORY = 1024 * 1024   # a larger unchunked listing is spooled to disk, not held


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
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
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


def _describe(exc: BaseException) -> str:
    """An unexpected exception in one line: its repr and where it was raised."""
    import traceback  # only on the path of a bug
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {str(exc)[:200]}{where}"


class _CloseConnection(Exception):
    """The connection cannot continue (framing lost, an error mid-body, shutting down)."""


class _HandshakeTimeout(TimeoutError):
    pass


class ConnectionHandler(socketserver.BaseRequestHandler):
    """Serves one connection: TLS, greeting, hello, auth, then any number of commands."""

    server: "FilesrvServer"

    def setup(self) -> None:
        self.options = self.server.options
        self.peer = format_address(self.client_address)
        self.buffer: bytearray | None = None  # only uploads need one: forks stay light
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.settimeout(self.options.idle_timeout)

    def handle(self) -> None:
        """The connection's life. Whatever ends it, from any frame in any phase, is
        mapped to one log line and at most one error reply by `_outcome`, never a traceback."""
        self.phase = "handshake"
        try:
            with _Deadline(self.options.handshake_timeout):
                self._start_tls()
                self.channel = Channel(self.request)
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
        except (_CloseConnection, PeerClosed):
            pass  # reported already, or a client that left between frames
        except Exception as exc:
            result, error = self._outcome(exc)
            self._log(self.phase, "-", 0, 0.0, result)
            if error is not None:
                self._send_error(error)

    def _outcome(self, exc: Exception) -> tuple[str, FilesrvError | None]:
        """How an exception that ends a command or a connection is logged, and the error
        reply the client gets (None: it cannot or need not be told)."""
        if isinstance(exc, _CloseConnection):
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
        return f"internal: {_describe(exc)}", ServerError("internal server error")

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
            raise _CloseConnection() from None
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
        raise _CloseConnection()

    def _run(self, header: dict[str, Any]) -> None:
        started = time.monotonic()
        op = str(header.get("op", "?"))[:16]
        path = str(header.get("path", "-"))[:200]
        self.moved = 0

        def done(result: str) -> None:
            self._log(op, path, self.moved, time.monotonic() - started, result)

        self.server.in_command = True
        try:
            request = parse_request(header)
            handler = self._dispatch.get(type(request))
            if handler is None:
                raise BadRequest(f"{request.op!r} is not valid here")
            handler(self, request)
        except Exception as exc:
            result, error = self._outcome(exc)
            done(result)
            if error is not None:
                self._send_error(error)
            if isinstance(exc, FilesrvError):
                return  # refused cleanly: the connection stays in sync
            raise _CloseConnection() from None
        finally:
            self.server.in_command = False
        done("ok")

    # -- commands

    def _ls(self, request: ListDir) -> None:
        skipped: list[str] = []  # names on disk that are not UTF-8: left out, counted

        def left_out() -> dict[str, Any]:
            if not skipped:
                return {}
            log(f"{self.peer} ls {request.path[:200]!r} left out {len(skipped)} name(s) "
                f"that are not valid UTF-8, e.g. {skipped[0][:200]!r}")
            return {"skipped": len(skipped)}

        entries = self.server.storage.iter_dir(parse_path(request.path, allow_root=True),
                                               recursive=request.recursive,
                                               on_skip=skipped.append)
        with contextlib.closing(entries):  # a listing cut short closes its directory
            if request.chunked:  # streamed: the child holds one chunk, not the tree
                for frame in encode_chunks((e.as_dict() for e in entries), final=left_out):
                    self.channel.send_frame(frame)
                    self.moved += len(frame)
                return
            # a client that does not chunk: one body with its length in front; past
            # _LISTING_IN_MEMORY the listing is spooled to disk as it is walked
            listed = _Counted(e.as_dict() for e in entries)
            pieces = encode_array(listed)
            held: list[bytes] = []
            size = 0
            for piece in pieces:
                held.append(piece)
                size += len(piece)
                if size > _LISTING_IN_MEMORY:
                    fd, length = self.server.storage.spool(itertools.chain(held, pieces))
                    break
            else:
                body = b"".join(held)
                self.channel.send_frame(encode_frame(ok_reply(
                    length=len(body), count=listed.count, **left_out())) + body)
                self.moved = len(body)
                return
        try:
            self.channel.send_header(ok_reply(length=length, count=listed.count,
                                              **left_out()))
            self._send_file(fd, 0, length)
        finally:
            os.close(fd)

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
            inline = f.size <= _INLINE_BODY  # one read for digest and body, one send
            if inline:
                data, digest = storage.read_small(f)
            else:
                data, digest = b"", storage.digest_of(f)
            self.channel.send_frame(encode_frame(ok_reply(
                size=f.size, offset=offset, length=length, etag=f.etag, xxh128=digest))
                + data[offset:])
            if inline:
                self.moved = length
            else:
                self._send_file(f.fd, offset, length)
        finally:
            f.close()

    def _send_file(self, fd: int, offset: int, length: int) -> None:
        try:
            sent = send_file(self.request, fd, offset, length)
        except OSError as exc:
            raise _CloseConnection(f"send failed: {exc.strerror or exc}") from None
        self.moved = sent
        if sent != length:  # the file shrank under us; the body can no longer be framed
            raise _CloseConnection("file shrank while it was sent")

    def _put(self, request: Put) -> None:
        self._writable()
        limit = self.options.max_file_size
        if limit is not None and request.size > limit:
            raise TooLarge(f"{request.size} bytes exceeds the server's limit of {limit}")
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
            upload.release_replaced()
        except FilesrvError as exc:
            upload.close()  # let a retry take the partial while we report
            if in_sync:
                raise
            self._fail_mid_body(exc)
        finally:
            upload.close()

    def _put_files(self, request: PutFiles) -> None:
        """Small files in one exchange: which do you need, their bytes, where each landed."""
        self._writable()
        storage = self.server.storage
        files = [(parse_path(f["path"]), f["size"], f["xxh128"]) for f in request.files]
        limit = self.options.max_file_size
        failed: dict[int, FilesrvError] = {
            index: TooLarge(f"{size} bytes exceeds the server's limit of {limit}")
            for index, (_, size, _) in enumerate(files) if limit is not None and size > limit}
        need, refused = storage.lacking(
            {index: f for index, f in enumerate(files) if index not in failed}, request.skip)
        failed.update(refused)
        self.channel.send_header(ok_reply(need=need))
        batch = storage.begin_batch()
        try:
            try:
                data = self._expect(Data)
            except BadRequest as exc:  # out of step: what follows may be body bytes
                self._fail_mid_body(exc)
            if data.length != sum(files[i][1] for i in need):
                self._fail_mid_body(BadRequest(f"data length {data.length} is not the sum "
                                               "of the needed files' sizes"))
            try:
                for index in need:
                    parts, size, digest = files[index]
                    if batch.receive(index, self._body(size)) == digest:
                        batch.received_whole(index, parts)
                    else:
                        failed[index] = IntegrityError(
                            f"{'/'.join(parts)}: XXH3-128 of the received bytes does not "
                            "match the client's; not placed")
            except FilesrvError as exc:  # e.g. no space: the client may still be sending
                self._fail_mid_body(exc)
            failed.update(batch.place_all())
        finally:
            batch.discard()
        failures = [{"index": i, "code": e.code, "message": e.message}
                    for i, e in sorted(failed.items())]
        if request.chunked:  # however many: they need not fit one header
            for frame in encode_chunks(failures):
                self.channel.send_frame(frame)
        else:
            self.channel.send_header(placed_reply(failures))

    def _get_files(self, request: GetFiles) -> None:
        """Many files in one reply: a frame for each (its error, or its bytes after it)."""
        self.channel.send_header(ok_reply(count=len(request.files)))
        pending: list[bytes] = []  # small files leave in large sends, not one send each
        pending_bytes = 0
        for entry in request.files:
            try:
                f = self.server.storage.open_for_read(parse_path(entry["path"]))
            except FilesrvError as exc:
                pending.append(encode_frame(error_reply(exc)))
                continue
            try:
                frame, tail = self._file_frame(f, entry["xxh128"])
                pending.append(frame)
                pending_bytes += len(frame)
                if tail or pending_bytes >= _BATCH_SEND_BYTES:
                    self.channel.send_frame(b"".join(pending))
                    pending, pending_bytes = [], 0
                if tail:
                    self._send_file(f.fd, 0, tail)
            except FilesrvError as exc:  # e.g. it shrank while read: can no longer frame it
                raise _CloseConnection(exc.code) from None
            finally:
                f.close()
        self.channel.send_frame(b"".join(pending))

    def _file_frame(self, f: ReadableFile, have: str | None) -> tuple[bytes, int]:
        """A get_files frame for an open file (a small body inside it; none when the
        client's copy `have` is current), and how many bytes must follow by sendfile."""
        storage = self.server.storage
        if f.size <= _INLINE_BODY:
            data, digest = storage.read_small(f)
            body = b"" if digest == have else data
            self.moved += len(body)
            return encode_frame(ok_reply(size=f.size, xxh128=digest, length=len(body))) + body, 0
        digest = storage.digest_of(f)
        length = 0 if digest == have else f.size
        return encode_frame(ok_reply(size=f.size, xxh128=digest, length=length)), length

    def _receive_into(self, upload: PartialUpload, length: int) -> None:
        with self.server.abortable():
            for chunk in self._body(length):
                upload.write(chunk)

    def _body(self, length: int) -> Iterator[memoryview]:
        """The next `length` body bytes, a buffer at a time (each view is reused)."""
        if self.buffer is None:
            self.buffer = bytearray(self.options.buffer_size)
        view = memoryview(self.buffer)
        remaining = length
        while remaining:
            got = self.channel.read_body_into(view[: min(len(view), remaining)])
            remaining -= got
            self.moved += got
            yield view[:got]

    def _expect(self, kind: type) -> Any:
        request = parse_request(self.channel.read_header())
        if not isinstance(request, kind):
            raise BadRequest(f"expected {kind.op!r}, got {request.op!r}")
        return request

    def _fail_mid_body(self, error: FilesrvError) -> NoReturn:
        """Report an error while the client may still be sending, then close."""
        self._send_error(error)
        if isinstance(error, Superseded):  # its client is gone or stalled: nobody to drain
            raise _CloseConnection(error.code)
        try:
            self.request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _ERROR_DRAIN_SECONDS
            self.request.settimeout(_ERROR_DRAIN_SECONDS)
            while time.monotonic() < deadline and self.request.recv(65536):
                pass
        except OSError:
            pass
        raise _CloseConnection(error.code)

    def _stat(self, request: Stat) -> None:
        storage = self.server.storage
        parts = parse_path(request.path, allow_root=True)
        kind, st = storage.stat_entry(parts)
        if kind == "dir":
            self.channel.send_header(ok_reply(type="dir", size=0, mtime=st.st_mtime))
            return
        if request.path.endswith("/"):
            raise _not_a_directory(request.path)
        f = storage.open_for_read(parts)  # refuses what is not a regular file
        try:
            self.channel.send_header(ok_reply(type="file", size=f.size, mtime=st.st_mtime,
                                              xxh128=storage.digest_of(f)))
        finally:
            f.close()

    def _writable(self) -> None:
        if self.options.read_only:
            raise ReadOnly("the server is read-only")

    def _rm(self, request: Remove) -> None:
        self._writable()
        parts = parse_path(request.path, allow_root=True)
        if request.path.endswith("/"):
            self._require_dir(parts, request.path)
        removed = self.server.storage.remove(parts, request.recursive)
        self.channel.send_header(ok_reply(removed=removed))

    def _mv(self, request: Move) -> None:
        self._writable()
        src = parse_path(request.src, allow_root=True)
        dst = parse_path(request.dst, allow_root=True)
        if request.src.endswith("/") or request.dst.endswith("/"):
            self._require_dir(src, request.src)  # only a directory can take "DST/"
        self.server.storage.move(src, dst)
        self.channel.send_header(ok_reply())

    def _require_dir(self, parts: tuple[str, ...], shown: str) -> None:
        """A trailing / names a directory (PROTOCOL.md §4): `parts` must be one."""
        if parts and self.server.storage.stat_entry(parts)[0] != "dir":
            raise _not_a_directory(shown)

    def _mkdir(self, request: MakeDir) -> None:
        self._writable()
        self.server.storage.make_dir(parse_path(request.path, allow_root=True),
                                     request.parents)
        self.channel.send_header(ok_reply())

    _dispatch: dict[type, Callable[["ConnectionHandler", Any], None]] = {
        ListDir: _ls, Get: _get, Put: _put, Stat: _stat, Remove: _rm, Move: _mv,
        MakeDir: _mkdir, PutFiles: _put_files, GetFiles: _get_files,
    }

    # -- helpers

    def _send_error(self, error: FilesrvError) -> None:
        try:
            self.channel.send_header(error_reply(error))
        except (OSError, AttributeError):  # AttributeError: before the channel existed
            pass

    def _log(self, op: str, path: str, moved: int, seconds: float, result: str) -> None:
        log(f"{self.peer} {op} {path!r} bytes={moved} {seconds:.3f}s {result}")


class _Counted:
    """An iterator that counts what it hands out."""

    def __init__(self, items: Iterator[Any]) -> None:
        self.items = items
        self.count = 0

    def __iter__(self) -> "_Counted":
        return self

    def __next__(self) -> Any:
        item = next(self.items)
        self.count += 1
        return item


def _not_a_directory(path: str) -> NotADirectory:
    return NotADirectory(f"{path.rstrip('/')!r} is not a directory (a trailing / names one)")


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
            raise _CloseConnection("shutting down")

    def abortable(self) -> "_Abortable":
        return _Abortable(self)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # one log line, never a traceback on stderr (socketserver's default prints one)
        exc = sys.exc_info()[1]
        if exc is None or isinstance(exc, (Superseded, _CloseConnection)):
            return  # already reported by the handler
        log(f"{format_address(client_address)} connection - internal: {_describe(exc)}")

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
        log("no --token-file: every client that can connect may read and write the root")
    if options.tls is None:
        log("no TLS: traffic, file contents included, crosses the network in the clear")
    if options.read_only:
        log("read-only: uploads are refused")
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
