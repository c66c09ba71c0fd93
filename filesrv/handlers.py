"""The daemon's commands: one handler for each, and the table that declares them.

`COMMANDS` names, for each request type, its handler and its policy (does it write? is a
body sent after its first reply? a line of help), as pyftpdlib's `proto_cmds`;
`run_command` enforces the policy, so no handler checks it by hand. The connection's
lifecycle (handshake, auth, the command loop, logging) is server.py's `ConnectionHandler`;
files are `Storage`'s: a handler names paths, Storage resolves them inside the root.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, NoReturn

from .daemonlog import log
from .errors import (BadRange, BadRequest, FilesrvError, IntegrityError, NotADirectory,
                     ReadOnly, Superseded, TooLarge)
from .protocol import (Commit, Data, Get, GetFiles, ListDir, MakeDir, Move, Put, PutFiles,
                       Remove, Request, Stat, encode_array, encode_chunks, encode_frame,
                       error_reply, ok_reply, parse_path, parse_request, placed_reply)
from .storage import PartialUpload, ReadableFile
from .transport import Channel, send_file

if TYPE_CHECKING:
    from .server import FilesrvServer, ServerOptions

_ERROR_DRAIN_SECONDS = 2.0         # after an error mid-body, read on so the client sees it
_INLINE_BODY = 64 * 1024           # get bodies up to this size go out with their header
_BATCH_SEND_BYTES = 256 * 1024     # get_files gathers small files into sends of this size
_LISTING_IN_MEMORY = 1024 * 1024   # a larger unchunked listing is spooled to disk, not held


class CloseConnection(Exception):
    """The connection cannot continue (framing lost, an error mid-body, shutting down)."""



class Session:
    """One connection's context, as the handlers see it: its socket and channel, the
    server (storage, abortable uploads), the options, the peer's name, the bytes moved by
    the current command; and the body I/O the handlers share."""

    channel: Channel  # set once the connection has one (after TLS)

    def __init__(self, server: "FilesrvServer", request: socket.socket,
                 options: "ServerOptions", peer: str) -> None:
        self.server = server
        self.request = request
        self.options = options
        self.peer = peer
        self.moved = 0
        self.buffer: bytearray | None = None  # only uploads need one: forks stay light

    def _send_file(self, fd: int, offset: int, length: int) -> None:
        try:
            sent = send_file(self.request, fd, offset, length)
        except OSError as exc:
            raise CloseConnection(f"send failed: {exc.strerror or exc}") from None
        self.moved = sent
        if sent != length:  # the file shrank under us; the body can no longer be framed
            raise CloseConnection("file shrank while it was sent")

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
            raise CloseConnection(error.code)
        try:
            self.request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _ERROR_DRAIN_SECONDS
            self.request.settimeout(_ERROR_DRAIN_SECONDS)
            while time.monotonic() < deadline and self.request.recv(65536):
                pass
        except OSError:
            pass
        raise CloseConnection(error.code)

    def _send_error(self, error: FilesrvError) -> None:
        try:
            self.channel.send_header(error_reply(error))
        except (OSError, AttributeError):  # AttributeError: before the channel existed
            pass


class Handlers(Session):
    """The command handlers; each gets the parsed request, replies, and counts `moved`."""

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

    def _put(self, request: Put) -> None:
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
                raise CloseConnection(exc.code) from None
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

    def _rm(self, request: Remove) -> None:
        parts = parse_path(request.path, allow_root=True)
        if request.path.endswith("/"):
            self._require_dir(parts, request.path)
        removed = self.server.storage.remove(parts, request.recursive)
        self.channel.send_header(ok_reply(removed=removed))

    def _mv(self, request: Move) -> None:
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
        self.server.storage.make_dir(parse_path(request.path, allow_root=True),
                                     request.parents)
        self.channel.send_header(ok_reply())


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


class Command(NamedTuple):
    """A command's handler and its policy, checked by `run_command` before the handler."""

    handler: Callable[[Handlers, Any], None]
    writes: bool   # changes the root: refused by a read-only server, before anything else
    body: bool     # the client sends a body after the first reply (data, then raw bytes)
    help: str


COMMANDS: dict[type[Request], Command] = {
    ListDir: Command(Handlers._ls, writes=False, body=False,
                     help="list a directory, or a tree"),
    Get: Command(Handlers._get, writes=False, body=False,
                 help="download a file, or its tail"),
    Put: Command(Handlers._put, writes=True, body=True,
                 help="upload a file: put, data, commit"),
    Stat: Command(Handlers._stat, writes=False, body=False,
                  help="a file's or a directory's facts"),
    Remove: Command(Handlers._rm, writes=True, body=False, help="delete"),
    Move: Command(Handlers._mv, writes=True, body=False, help="rename"),
    MakeDir: Command(Handlers._mkdir, writes=True, body=False, help="create a directory"),
    PutFiles: Command(Handlers._put_files, writes=True, body=True,
                      help="many small files in one exchange"),
    GetFiles: Command(Handlers._get_files, writes=False, body=False,
                      help="many files in one exchange"),
}


def run_command(session: Handlers, request: Request) -> None:
    """Run a parsed request's handler once its policy allows it."""
    command = COMMANDS.get(type(request))
    if command is None:  # hello, auth, data, commit: not commands of their own here
        raise BadRequest(f"{request.op!r} is not valid here")
    if command.writes and session.options.read_only:
        raise ReadOnly("the server is read-only")
    command.handler(session, request)
