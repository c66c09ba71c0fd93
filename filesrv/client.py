"""The filesrv client: a Python API over one connection, usable without the CLI.

    with Client("127.0.0.1", 8750) as c:
        c.put("big.iso", "isos/big.iso")
        c.get("isos/big.iso", "/tmp/big.iso")
        for entry in c.ls("isos"):
            print(entry.name, entry.size)
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple, TypeVar

import xxhash

from .connection import DEFAULT_PORT, Connection, server_failure
from .connection import parse_server  # noqa: F401 (re-exported: the CLI uses it)
from .errors import (ConfigError, ConnectionFailed, FilesrvError, IntegrityError,
                     IsADirectory, LocalError, LocalNoSpace, NotFound, ProtocolError,
                     SourceChanged)
from .hashing import hash_fd_range
from .local import (LocalPartial, StreamSink, existing_file, file_digest, free_bytes,
                    make_local_dir, no_local_space, place_and_close, place_together,
                    placement_target, writes_through)
from .protocol import (MAX_BATCH_FILES, SKIP_EXISTING, SKIP_IDENTICAL, Commit, Data, Entry,
                       Get, GetFiles, ListDir, MakeDir, Move, Put, PutFiles, Remove, Stat,
                       StatReply, check_reply, decode_listing, normalize_path,
                       parse_commit_reply, parse_file_reply, parse_get_reply,
                       parse_list_reply, parse_need_reply, parse_path, parse_placed_reply,
                       parse_put_reply, parse_removed_reply, parse_stat_reply)
from .retry import DEFAULT_TIMEOUT, RETRIES, Reconnecting, RetryPolicy
from .sources import (LocalSource, TreePlan, file_version, is_settled, plan_local_tree,
                      source_tag)
from .transport import Channel, TornFrame

DEFAULT_BUFFER_SIZE = 1024 * 1024
_SMALL_BUFFER = 64 * 1024     # enough for small files; allocating 1 MiB costs ~0.1 ms
RESUMABLE_BODY = 1024 * 1024  # smaller downloads are not worth a resume record
# Trees: files up to BATCH_FILE_MAX travel many to an exchange (put_files/get_files), in
# batches of up to BATCH_BYTES and MAX_BATCH_FILES files whose manifest stays under
# BATCH_MANIFEST_BYTES (the header limit is 64 KiB). Larger files go one by one, resumable.
BATCH_FILE_MAX = 1024 * 1024
BATCH_BYTES = 8 * 1024 * 1024
BATCH_MANIFEST_BYTES = 48 * 1024
DURABLE_BATCH_FILES = 256  # with --fsync a batch's partials stay open until one flush
AHEAD_BYTES = 32 * 1024   # requests sent before their replies are read (PROTOCOL.md 2.5)

_T = TypeVar("_T")

# overwrite policies for get and put
REPLACE = "replace"        # the default: the new copy replaces the old one, atomically
NO_CLOBBER = "no-clobber"  # an existing destination is left alone
UPDATE = "update"          # transfer only when the destination's digest differs


# progress(done, total): bytes of the file present so far (resumed bytes included)
Progress = Callable[[int, int], None]


class TransferResult(NamedTuple):
    """What one get or put did; as_dict() is the --json record."""

    path: str
    size: int
    resumed_from: int
    xxh128: str
    seconds: float
    skipped: bool = False  # the overwrite policy left the destination as it was
    # bytes of the body that crossed the connection, in every attempt (a cut one's too);
    # None: size - resumed_from, or 0 when skipped
    transferred: int | None = None
    reconnects: int = 0  # connections cut and made again during the transfer
    # of `seconds`, the time no data moved because of cuts: from the last byte before a
    # cut to the first byte after reconnecting (for a batch, from the start of the attempt
    # that was cut to the start of the next: its bytes are sent again)
    reconnect_seconds: float = 0.0

    @property
    def bytes_moved(self) -> int:
        if self.transferred is not None:
            return self.transferred
        return 0 if self.skipped else self.size - self.resumed_from

    @property
    def rate(self) -> float:
        """Bytes a second while data was moving: the time spent reconnecting left out."""
        moving = self.seconds - self.reconnect_seconds
        return self.bytes_moved / moving if moving > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        record = self._asdict()
        if not self.skipped:
            del record["skipped"]  # the record users and scripts know, unchanged
        record["transferred"] = self.bytes_moved
        return record


class _Clock:
    """Times one transfer over all its attempts, wrapping its progress callback: the
    bytes that moved, and the time lost to cuts (from the last byte before a cut to the
    first byte after reconnecting), so that a rate can leave the outage out."""

    def __init__(self, client: "Client", progress: Progress | None) -> None:
        self.client = client
        self.progress = progress
        self.started = time.monotonic()
        self.transferred = 0
        self.reconnects = 0
        self.reconnect_seconds = 0.0
        self._position: int | None = None  # None: this attempt has moved nothing yet
        self._moved_at = self.started
        self._cut_at: float | None = None

    def attempt(self, fn: Callable[[], _T], *, streams: bool = True) -> Callable[[], _T]:
        """fn as an attempt for Client._retrying; `streams`: it reports its bytes through
        this clock (else data counts as moving again as soon as the attempt starts)."""
        def run() -> _T:
            self._position = None
            if not streams:
                self._moving(time.monotonic())
            try:
                return fn()
            except ConnectionFailed as exc:
                if exc.retryable:
                    self.reconnects += 1
                    if self._cut_at is None:
                        self._cut_at = self._moved_at
                raise
        return run

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self._position is None:
            self._moving(now)
        else:
            self.transferred += done - self._position
        self._position = done
        self._moved_at = now
        if self.progress:
            self.progress(done, total)

    def _moving(self, now: float) -> None:
        if self._cut_at is not None:
            self.reconnect_seconds += now - self._cut_at
            self.client.reconnect_seconds += now - self._cut_at
            self._cut_at = None
        self._moved_at = now

    def result(self, path: str, size: int, resumed_from: int, digest: str
               ) -> "TransferResult":
        return TransferResult(path, size, resumed_from, digest,
                              time.monotonic() - self.started, False, self.transferred,
                              self.reconnects, self.reconnect_seconds)

    def mark(self, result: "TransferResult") -> "TransferResult":
        """A batch's result (timed over its last attempt) with the batch's reconnects."""
        if not self.reconnects:
            return result
        return result._replace(seconds=result.seconds + self.reconnect_seconds,
                               reconnects=self.reconnects,
                               reconnect_seconds=self.reconnect_seconds)


def read_token_file(path: str) -> bytes:
    """The first non-blank, non-comment line of a token file."""
    try:
        with open(path, "rb") as fh:
            for line in fh.read().splitlines():
                if line.strip() and not line.strip().startswith(b"#"):
                    return line.strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror}") from None
    raise ConfigError(f"token file {path} holds no token")


class RateLimiter:
    """Keeps the average rate since start at or below `rate` bytes per second."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.count = 0

    def consume(self, n: int) -> None:
        if not self.rate:
            return
        self.count += n
        ahead = self.count / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


class Client(Connection):
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
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        super().__init__(host, port, timeout=timeout, token=token, tls=tls, cafile=cafile,
                         retries=retries, retry=retry, on_retry=on_retry, on_wait=on_wait)
        self.buffer_size = buffer_size
        self.limit_rate = limit_rate
        self.durable = durable  # fsync each downloaded file before it takes its name
        self._buffers: dict[int, bytearray] = {}
        self._sent_ahead: _SentAhead | None = None

    # ------------------------------------------------------------ buffers

    def _buffer(self, needed: int) -> bytearray:
        """A reusable buffer for `needed` bytes: small transfers do not pay for a big one."""
        size = self.buffer_size if needed > _SMALL_BUFFER else min(self.buffer_size,
                                                                    _SMALL_BUFFER)
        buffer = self._buffers.get(size)
        if buffer is None:
            buffer = self._buffers[size] = bytearray(size)
        return buffer

    # ------------------------------------------------------------ ls

    def ls(self, path: str = "", recursive: bool = False) -> list[Entry]:
        """One directory's entries; recursive: the whole tree, names relative to `path`."""
        parse_path(path, allow_root=True)
        return self._retrying(lambda: self._ls_once(path, recursive))

    def _ls_once(self, path: str, recursive: bool) -> list[Entry]:
        self._request(ListDir(path=path, recursive=recursive).frame())
        length = self._reply(parse_list_reply)
        with self._server_failures():
            return decode_listing(self.channel.read_body(length))


    # ------------------------------------------------------------ management

    def stat(self, path: str) -> StatReply:
        """type ("file"/"dir"), size, mtime and, for files, the XXH3-128 digest."""
        parse_path(path, allow_root=True)
        return self._retrying(lambda: self._stat_once(path))

    def _stat_once(self, path: str) -> StatReply:
        self._request(Stat(path=path).frame())
        return self._reply(parse_stat_reply)

    def _remote_file(self, path: str) -> StatReply | None:
        try:
            return self.stat(path)
        except NotFound:
            return None

    def hash(self, path: str) -> str:
        """The server's XXH3-128 digest of a file, as xxh128sum prints it."""
        info = self.stat(path)
        if info.xxh128 is None:
            raise IsADirectory(f"{path!r} is a directory")
        return info.xxh128

    def hash_tree(self, remote_dir: str) -> Iterator[tuple[str, int, str]]:
        """(name relative to remote_dir, size, XXH3-128) of every file in a tree.

        The stat requests go out many at a time (up to AHEAD_BYTES), not a round
        trip each.
        """
        base = remote_dir.rstrip("/")
        files = [e for e in self.ls(base, recursive=True) if e.type == "file"]
        start = 0
        while start < len(files):
            names, frames, size = [], [], 0
            while start + len(names) < len(files) and size < AHEAD_BYTES:
                names.append(files[start + len(names)].name)
                frames.append(Stat(path=_join(base, names[-1])).frame())
                size += len(frames[-1])
            # a run is read whole before it is yielded, so a cut connection retries it
            request = b"".join(frames)
            yield from self._retrying(lambda: self._hash_run(names, request))
            start += len(names)

    def _hash_run(self, names: list[str], request: bytes) -> list[tuple[str, int, str]]:
        """One pipelined run of stat requests: (name, size, XXH3-128) of each."""
        self._request(request)
        out = []
        for name in names:
            try:
                info = self._reply(parse_stat_reply)
                if info.xxh128 is None:
                    raise IsADirectory(f"{name!r} became a directory")
            except FilesrvError:
                self.close()  # the other replies of this run are unread
                raise
            out.append((name, info.size, info.xxh128))
        return out

    def rm(self, path: str, recursive: bool = False) -> int:
        """Delete a file (or with recursive, a directory tree); how many entries went."""
        parse_path(path, allow_root=True)
        self._request(Remove(path=path, recursive=recursive).frame())
        return self._reply(parse_removed_reply)

    def mv(self, src: str, dst: str) -> None:
        """Rename within the server's root, atomically."""
        parse_path(src, allow_root=True)
        parse_path(dst, allow_root=True)
        self._request(Move(src=src, dst=dst).frame())
        self._reply(check_reply)

    def mkdir(self, path: str, parents: bool = False) -> None:
        parse_path(path, allow_root=True)
        self._request(MakeDir(path=path, parents=parents).frame())
        self._reply(check_reply)

    # ------------------------------------------------------------ get

    def get(self, remote: str, local: str, *, progress: Progress | None = None,
            overwrite: str = REPLACE) -> TransferResult:
        """Download `remote` to the file `local`, resuming a partial left beside it.

        The partial is renamed to `local` only after the whole-file digest matched.
        overwrite: REPLACE (default), NO_CLOBBER (keep an existing `local`), UPDATE
        (skip when `local` already has the remote digest).
        """
        parse_path(remote)
        clock = _Clock(self, progress)
        if writes_through(local):
            return self._get_through(remote, local, clock)
        if overwrite != REPLACE and os.path.isfile(local):
            local_digest = file_digest(local)
            if overwrite == NO_CLOBBER or local_digest == self.hash(remote):
                return TransferResult(normalize_path(remote), os.path.getsize(local), 0,
                                      local_digest, time.monotonic() - clock.started, True)
        partial = LocalPartial(local, durable=self.durable)
        try:
            result = self._retrying(clock.attempt(lambda: self._get_into(remote, partial,
                                                                         clock)))
            if result is None:  # a resumed partial did not verify: once more from zero
                partial.reset()
                result = self._retrying(clock.attempt(lambda: self._get_into(remote, partial,
                                                                             clock)))
            if result is None:
                raise IntegrityError(f"{remote}: XXH3-128 of the received bytes does not "
                                     "match the server's; the partial was discarded")
            size, resumed_from, digest = result
            partial.place()
        finally:
            partial.close()
        return clock.result(normalize_path(remote), size, resumed_from, digest)

    def _get_through(self, remote: str, local: str, clock: "_Clock") -> TransferResult:
        """Download `remote` into the character device or FIFO `local`, written in order
        (nothing is replaced). A cut resumes after the bytes written, from the same
        version of the file only: bytes written cannot be taken back."""
        sink = StreamSink(local)
        try:
            size, digest = self._retrying(clock.attempt(
                lambda: self._stream_once(remote, sink, clock)))
        finally:
            sink.close()
        return clock.result(normalize_path(remote), size, 0, digest)

    def _stream_once(self, remote: str, sink: "StreamSink", progress: Progress | None
                     ) -> tuple[int, str]:
        self._request(Get(path=remote, offset=sink.written, if_match=sink.etag).frame())
        reply = self._reply(parse_get_reply)
        if reply.offset != sink.written:
            self.close()  # its body is not wanted
            raise IntegrityError(f"{remote} changed on the server while it was written to "
                                 f"{sink.path}; what was written is not one version of it")
        sink.etag = reply.etag
        self._receive_body(sink, reply.offset, reply.length, reply.size, sink.hasher,
                           progress, None)
        if sink.hasher.hexdigest() != reply.xxh128:
            raise IntegrityError(f"{remote}: XXH3-128 of the bytes written to {sink.path} "
                                 "does not match the server's")
        return reply.size, reply.xxh128

    def _get_into(self, remote: str, partial: "LocalPartial", progress: Progress | None
                  ) -> tuple[int, int, str] | None:
        offset, etag = partial.resume_point(remote)
        self._request(Get(path=remote, offset=offset, if_match=etag).frame())
        reply = self._reply(parse_get_reply)
        if reply.offset != offset:
            partial.truncate(reply.offset)
        if reply.length >= RESUMABLE_BODY:
            partial.remember(remote, reply.etag, reply.size)
        hasher = xxhash.xxh3_128()
        try:
            hash_fd_range(partial.fd, 0, reply.offset, hasher, self._buffer(reply.offset))
        except (OSError, FilesrvError) as exc:
            raise LocalError(f"cannot read the partial download: {exc}") from None
        if not self._receive_verified(partial, reply.offset, reply.length, reply.size, hasher,
                                      reply.xxh128, progress):
            if reply.offset:
                return None
            raise _mismatch(remote)
        return reply.size, reply.offset, reply.xxh128

    def _receive_verified(self, partial: "LocalPartial", offset: int, length: int, size: int,
                          hasher: "xxhash.xxh3_128", digest: str, progress: Progress | None,
                          limiter: RateLimiter | None = None) -> bool:
        """Receive a body into the partial; False (the partial emptied) when the whole
        file's XXH3-128, `hasher` fed with what came before `offset`, is not `digest`."""
        self._receive_body(partial, offset, length, size, hasher, progress, limiter)
        if hasher.hexdigest() == digest:
            return True
        partial.reset()
        return False

    def _receive_body(self, partial: "LocalPartial | StreamSink", offset: int, length: int,
                      size: int,
                      hasher: "xxhash.xxh3_128", progress: Progress | None,
                      limiter: RateLimiter | None) -> None:
        view = memoryview(self._buffer(length))
        channel = self.channel
        limiter = limiter or RateLimiter(self.limit_rate)
        position = offset
        end = offset + length
        if isinstance(partial, LocalPartial):  # a file, not a device or FIFO written through
            free = free_bytes(partial.folder)
            if free is not None and length > free:  # fail before the first byte, not the last
                self.close()  # the body stays unread
                raise no_local_space(partial, length, free, offset)
        if progress:
            progress(position, size)
        while position < end:
            try:
                got = channel.read_body_into(view[: min(len(view), end - position)])
            except (OSError, TornFrame) as exc:  # mapped here, not per read: the hot loop
                self.close()
                raise ConnectionFailed(
                    f"connection lost after {position} of {size} bytes "
                    f"({server_failure(exc).message}); run the same command again to "
                    "resume") from None
            chunk = view[:got]
            try:
                partial.write(chunk, position)
            except LocalNoSpace:  # the space went while we wrote (another writer)
                self.close()
                assert isinstance(partial, LocalPartial)  # only its writes say LocalNoSpace
                raise no_local_space(partial, end - position,
                                     free_bytes(partial.folder) or 0, position) from None
            hasher.update(chunk)
            position += got
            limiter.consume(got)
            if progress:
                progress(position, size)

    # ------------------------------------------------------------ put

    def put(self, local: str, remote: str, *, progress: Progress | None = None,
            overwrite: str = REPLACE) -> TransferResult:
        """Upload the file `local` to `remote`, resuming the server's partial if any.

        overwrite: as for get, about the remote file.
        """
        parse_path(remote)
        clock = _Clock(self, progress)
        try:
            fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise LocalError(f"cannot open {local}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise LocalError(f"{local} is not a regular file")
            if overwrite != REPLACE:
                existing = self._remote_file(remote)
                if existing is not None and existing.type == "dir":  # not a file to keep
                    raise IsADirectory(f"{remote!r} is a directory")
                if existing is not None and (overwrite == NO_CLOBBER or existing.xxh128 ==
                                             file_digest(local)):
                    return TransferResult(normalize_path(remote), existing.size, 0,
                                          existing.xxh128 or "",
                                          time.monotonic() - clock.started, True)
            source, resumed_from, digest = self._put_one_version(fd, local, remote, clock)
        finally:
            os.close(fd)
        return clock.result(normalize_path(remote), source.st.st_size, resumed_from, digest)

    def _put_one_version(self, fd: int, local: str, remote: str, clock: "_Clock"
                         ) -> tuple["LocalSource", int, str]:
        """Upload one consistent version of the open file: (that version, resumed_from,
        digest). A change seen while it was read starts the upload over once, from the
        new version; a second one is SourceChanged. The server's name is never given to
        bytes from two versions."""
        for restarts_left in (1, 0):
            source = LocalSource.now(fd)
            try:
                return (source, *self._put_version(source, remote, clock))
            except SourceChanged:
                if not restarts_left:
                    raise SourceChanged(f"source changed during transfer: {local} was "
                                        f"modified while it was read, twice; {remote} was "
                                        "left as it was") from None
        raise AssertionError("unreachable")

    def _put_version(self, source: "LocalSource", remote: str, clock: "_Clock"
                     ) -> tuple[int, str]:
        outcome = self._retrying(clock.attempt(lambda: self._put_once(source, remote, clock)))
        if outcome is None:
            # a resumed upload did not verify and the server dropped its partial
            outcome = self._retrying(clock.attempt(lambda: self._put_once(source, remote,
                                                                          clock)))
        if outcome is None:
            raise IntegrityError(f"{remote}: the server's digest did not match twice")
        return outcome

    def _put_once(self, source: "LocalSource", remote: str,
                  progress: Progress | None) -> tuple[int, str] | None:
        """One attempt: (resumed_from, digest), or None if a resumed attempt did not verify."""
        fd, size = source.fd, source.st.st_size
        self._request(Put(path=remote, size=size, source=source_tag(source.st)).frame())
        offset = self._reply(parse_put_reply).offset
        if offset > size:
            self.close()
            raise ProtocolError(f"server offered to resume at {offset}, beyond {size}")
        hasher = xxhash.xxh3_128()
        try:
            hash_fd_range(fd, 0, offset, hasher, self._buffer(offset))
        except FilesrvError:
            self.close()
            raise SourceChanged("the local file shrank") from None
        self._send(Data(length=size - offset).frame())
        self._send_body(fd, offset, size, hasher, progress)
        try:
            # the last moment to refuse: after the commit the server places the file.
            # Without it, the connection closing abandons the upload; nothing is placed.
            source.check_unchanged(hasher.hexdigest(), self._buffer(size))
        except SourceChanged:
            self.close()
            raise
        self._send(Commit(xxh128=hasher.hexdigest()).frame())
        try:
            reply = self._reply(parse_commit_reply)
        except IntegrityError:
            if offset:
                return None
            raise
        return offset, reply.xxh128

    def _send_body(self, fd: int, offset: int, size: int, hasher: "xxhash.xxh3_128",
                   progress: Progress | None) -> None:
        view = memoryview(self._buffer(size - offset))
        limiter = RateLimiter(self.limit_rate)
        zero_copy = self.tls is None  # the bytes we hash are then sent from the page cache
        position = offset
        if progress:
            progress(position, size)
        while position < size:
            got = os.preadv(fd, [view[: min(len(view), size - position)]], position)
            if got == 0:
                self.close()  # the body can no longer be framed
                raise SourceChanged("the local file shrank while it was being sent")
            chunk = view[:got]
            hasher.update(chunk)
            if zero_copy:
                self._sendfile(fd, position, got)
            else:
                self._send(chunk)
            position += got
            limiter.consume(got)
            if progress:
                progress(position, size)

    def _sendfile(self, fd: int, position: int, count: int) -> None:
        sock = self.channel.sock
        try:
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as fh:
                sent = sock.sendfile(fh, position, count)
        except OSError as exc:
            self._raise_pending_error(exc)
        if sent != count:
            self.close()
            raise SourceChanged("the local file shrank while it was being sent")


    # ------------------------------------------------------------ trees

    def put_tree(self, local_dir: str, remote_dir: str, *, progress: Progress | None = None,
                 overwrite: str = REPLACE, on_file: Callable[[TransferResult], None] | None
                 = None, plan: TreePlan | None = None) -> list[TransferResult]:
        """Upload a directory tree over this connection; empty directories are kept.

        Files already present with the same size and XXH3-128 are skipped, so a re-run
        after an interruption moves only the rest (and resumes the large file that was
        cut). Small files go many to an exchange. Symlinks are never followed: they are
        skipped (see TreePlan.skipped_links). `plan`: plan_local_tree(local_dir) if the
        caller has it.
        """
        plan = plan_local_tree(local_dir) if plan is None else plan
        base = remote_dir.rstrip("/")
        small = [(os.path.join(local_dir, rel), _join(base, rel), size)
                 for rel, size in plan.files if size <= BATCH_FILE_MAX]
        batches = list(_batches(small))
        skip = SKIP_EXISTING if overwrite == NO_CLOBBER else SKIP_IDENTICAL
        reads: dict[int, _InThread] = {}

        def read_ahead(i: int) -> None:
            # batch i is read and hashed while the server still works on batch i - 1
            if i < len(batches) and i not in reads:
                reads[i] = _InThread(lambda: _read_batch(batches[i], skip))

        read_ahead(0)  # while the remote tree is listed
        remote = {e.name: e for e in self._tree_or_empty(base)}
        if base and not remote:
            self.mkdir(base, parents=True)  # even an empty tree arrives
        holding_files = {rel.rsplit("/", i)[0] for rel, _ in plan.files
                         for i in range(1, rel.count("/") + 1)}
        for rel in plan.dirs:  # the others are created with their files
            if rel not in remote and rel not in holding_files:
                self.mkdir(_join(base, rel), parents=True)
        results, done = _tree_report(progress, on_file)
        for i in range(len(batches)):
            prepared = reads.pop(i).result()
            clock = _Clock(self, None)
            for result in self._retrying(clock.attempt(
                    lambda: self._put_batch(prepared, lambda: read_ahead(i + 1)),
                    streams=False)):
                done(clock.mark(result))
        for rel, size in plan.files:
            if size <= BATCH_FILE_MAX:
                continue
            there = remote.get(rel)
            policy = overwrite
            if there is not None and there.type == "file" and there.size == size:
                policy = UPDATE if overwrite == REPLACE else overwrite
            done(self.put(os.path.join(local_dir, rel), _join(base, rel), progress=progress,
                          overwrite=policy))
        return results

    def _put_batch(self, prepared: "_PutBatch", sent: Callable[[], None]
                   ) -> list[TransferResult]:
        """One put_files exchange; the server says which files it lacks.

        `sent` runs once the bodies are out, while the server writes and places them.
        """
        started = time.monotonic()
        manifest, bodies = prepared.manifest, prepared.bodies
        self._request(prepared.request)
        need = self._reply(lambda h: parse_need_reply(h, len(manifest)))
        pending = [Data(length=sum(len(bodies[i]) for i in need)).frame()]
        pending_bytes = 0
        limiter = RateLimiter(self.limit_rate)
        for i in need:  # small bodies leave in large sends, not one send each
            pending.append(bodies[i])
            pending_bytes += len(bodies[i])
            limiter.consume(len(bodies[i]))
            if pending_bytes >= _SMALL_BUFFER * 4:
                self._send(b"".join(pending))
                pending, pending_bytes = [], 0
        self._send(b"".join(pending))
        sent()
        failed = self._reply(lambda h: parse_placed_reply(h, len(manifest)))
        if failed:
            index, error = min(failed.items())
            raise type(error)(f"{manifest[index]['path']}: {error.message}")
        seconds = time.monotonic() - started
        wanted = set(need)
        return [TransferResult(normalize_path(m["path"]), m["size"], 0, m["xxh128"], seconds,
                               i not in wanted, m["size"] if i in wanted else 0)
                for i, m in enumerate(manifest)]

    def get_tree(self, remote_dir: str, local_dir: str, *, progress: Progress | None = None,
                 overwrite: str = REPLACE, on_file: Callable[[TransferResult], None] | None
                 = None, listing: list[Entry] | None = None) -> list[TransferResult]:
        """Download a directory tree over this connection; empty directories are kept.

        Local files with the same size and XXH3-128 as the remote ones are skipped.
        Small files come many to an exchange; larger ones one by one, resumable.
        `listing`: the tree's `ls(remote_dir, recursive=True)` if the caller has it.
        """
        base = remote_dir.rstrip("/")
        entries = self.ls(base, recursive=True) if listing is None else listing
        for entry in entries:  # a hostile server must not steer writes out of local_dir
            try:
                parse_path(entry.name)
            except FilesrvError:
                raise ProtocolError(f"server listed an unsafe name {entry.name!r}") from None
        make_local_dir(local_dir)
        results, done = _tree_report(progress, on_file)

        small = []
        for entry in entries:
            local = os.path.join(local_dir, *entry.name.split("/"))
            if entry.type == "dir":
                make_local_dir(local)
            elif entry.size <= BATCH_FILE_MAX:
                small.append((_join(base, entry.name), local, entry.size))
        per_batch = DURABLE_BATCH_FILES if self.durable else MAX_BATCH_FILES
        batches = list(_batches(small, per_batch))
        try:
            for i, batch in enumerate(batches):
                ahead = batches[i + 1] if i + 1 < len(batches) else None
                clock = _Clock(self, None)
                for result in self._retrying(clock.attempt(
                        lambda: self._get_batch(batch, overwrite, ahead), streams=False)):
                    done(clock.mark(result))
        finally:
            if self._sent_ahead is not None:  # stopped early: its reply must not be read
                self._sent_ahead = None       # as the answer to this client's next command
                self.close()
        for entry in entries:
            if entry.type == "dir" or entry.size <= BATCH_FILE_MAX:
                continue
            local = os.path.join(local_dir, *entry.name.split("/"))
            placement_target(local)  # a device or FIFO in the way: refused, as for small files
            policy = overwrite
            if os.path.isfile(local) and os.path.getsize(local) == entry.size:
                policy = UPDATE if overwrite == REPLACE else overwrite
            done(self.get(_join(base, entry.name), local, progress=progress, overwrite=policy))
        return results

    def _get_batch(self, batch: list[tuple[str, str, int]], overwrite: str,
                   ahead: list[tuple[str, str, int]] | None = None) -> list[TransferResult]:
        """One get_files exchange; files the local side already has are not sent.

        The request for the `ahead` batch goes out before this reply is read, so the
        server prepares it while this one is written to disk.
        """
        started = time.monotonic()
        sent = self._sent_ahead
        self._sent_ahead = None
        if sent is not None and sent.batch is batch and sent.channel is self._channel:
            plan = sent.plan  # requested on this connection with the previous batch
        else:
            plan = _plan_get_batch(batch, overwrite)
            if plan.wanted:
                self._request(plan.request)
        if ahead is not None and self._channel is not None:
            upcoming = _plan_get_batch(ahead, overwrite)
            if upcoming.wanted:
                self._send(upcoming.request)
            self._sent_ahead = _SentAhead(self._channel, ahead, upcoming)
        if not plan.wanted:
            return plan.kept  # type: ignore[return-value]
        self._reply(check_reply)
        received = iter(self._receive_files(plan.wanted, started))
        return [r if r is not None else next(received) for r in plan.kept]

    def _receive_files(self, wanted: list[tuple[str, str, str | None]], started: float
                       ) -> list[TransferResult]:
        """Read one get_files reply, writing each file beside its destination.

        With --fsync the batch's files are flushed together and only then renamed, and
        the renames flushed together: two flushes a batch instead of one a file.
        """
        out = []
        held: list[LocalPartial] = []
        limiter = RateLimiter(self.limit_rate)  # one for the batch: --limit-rate holds
        try:
            for remote, local, have in wanted:
                reply = self._reply(parse_file_reply)
                if reply.length == 0 and reply.xxh128 == have:
                    out.append(TransferResult(normalize_path(remote), reply.size, 0,
                                              reply.xxh128, time.monotonic() - started, True))
                    continue
                if reply.length != reply.size:
                    raise ProtocolError("the server sent no body for a changed file")
                partial = self._store_received(remote, local, reply.size, reply.xxh128,
                                               limiter)
                if self.durable:
                    held.append(partial)
                else:
                    place_and_close(partial)
                out.append(TransferResult(normalize_path(remote), reply.size, 0, reply.xxh128,
                                          time.monotonic() - started))
        except FilesrvError as exc:
            for partial in held:
                partial.close()
            self.close()  # the rest of the reply is unread: the next command reconnects
            if isinstance(exc, ConnectionFailed) or exc.message.startswith(remote):
                raise
            raise type(exc)(f"{remote}: {exc.message}") from None
        place_together(held)
        return out

    def _store_received(self, remote: str, local: str, size: int, digest: str,
                        limiter: RateLimiter) -> "LocalPartial":
        """A verified file in its partial beside `local`, not yet placed (still locked)."""
        partial = LocalPartial(local, durable=False)  # flushed by the caller if at all
        try:
            partial.truncate(0)
            if not self._receive_verified(partial, 0, size, size, xxhash.xxh3_128(), digest,
                                          None, limiter):
                raise _mismatch(remote)
        except BaseException:
            partial.close()
            raise
        return partial

    def _tree_or_empty(self, remote_dir: str) -> list[Entry]:
        try:
            return self.ls(remote_dir, recursive=True)
        except NotFound:
            return []


class _GetPlan(NamedTuple):
    """A get_files batch as requested: results known without asking (None: wanted),
    the (remote, local, digest of the local copy) wanted, and the request frame."""

    kept: list[TransferResult | None]
    wanted: list[tuple[str, str, str | None]]
    request: bytes


class _SentAhead(NamedTuple):
    """A get_files request sent before the previous batch's reply was read."""

    channel: Channel
    batch: list[tuple[str, str, int]]
    plan: _GetPlan


def _plan_get_batch(batch: list[tuple[str, str, int]], overwrite: str) -> _GetPlan:
    kept: list[TransferResult | None] = []
    wanted: list[tuple[str, str, str | None]] = []
    for remote, local, _ in batch:
        existing = existing_file(local)
        if existing is not None and overwrite == NO_CLOBBER:
            size, digest = existing
            kept.append(TransferResult(normalize_path(remote), size, 0, digest, 0.0, True))
            continue
        kept.append(None)
        wanted.append((remote, local, None if existing is None else existing[1]))
    request = GetFiles([{"path": r, "xxh128": have} for r, _, have in wanted]).frame()
    return _GetPlan(kept, wanted, request)


def _mismatch(remote: str) -> IntegrityError:
    return IntegrityError(f"{remote}: XXH3-128 of the received bytes does not match the "
                          "server's; the partial was discarded")


def _tree_report(progress: Progress | None,
                 on_file: Callable[[TransferResult], None] | None
                 ) -> tuple[list[TransferResult], Callable[[TransferResult], None]]:
    """A tree transfer's results, and the function that records each file in them."""
    results: list[TransferResult] = []

    def done(result: TransferResult) -> None:
        # a batch reports its files when it is placed: each as complete, then done
        if progress and not result.skipped:
            progress(result.size, result.size)
        results.append(result)
        if on_file:
            on_file(result)
    return results, done


def _batches(items: list[tuple[str, str, int]], max_files: int = MAX_BATCH_FILES
             ) -> Iterator[list[tuple[str, str, int]]]:
    """Consecutive runs of (from, to, size) within the batch limits (bytes, count, and
    manifest size, where the remote path is the longer of the two names at worst)."""
    batch: list[tuple[str, str, int]] = []
    total = manifest = 0
    for item in items:
        size = item[2]
        entry = 80 + max(_json_size(item[0]), _json_size(item[1]))
        if batch and (total + size > BATCH_BYTES or len(batch) == max_files
                      or manifest + entry > BATCH_MANIFEST_BYTES):
            yield batch
            batch, total, manifest = [], 0, 0
        batch.append(item)
        total += size
        manifest += entry
    if batch:
        yield batch


class _PutBatch(NamedTuple):
    """A put_files batch read from disk: its manifest, bodies and request frame."""

    manifest: list[dict[str, Any]]
    bodies: list[bytes]
    request: bytes


def _json_size(text: str) -> int:
    """Bytes of `text` as a JSON string (UTF-8, ensure_ascii=False), quotes included."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return len(text.encode()) + 2  # nothing to escape: the common case, 10x cheaper
    return len(json.dumps(text, ensure_ascii=False).encode())


def _read_batch(batch: list[tuple[str, str, int]], skip: str) -> _PutBatch:
    """Read and hash the files of a batch, and frame the put_files request for them."""
    manifest, bodies = [], []
    for local, remote, _ in batch:
        body = _read_small_file(local)
        bodies.append(body)
        manifest.append({"path": remote, "size": len(body),
                         "xxh128": xxhash.xxh3_128_hexdigest(body)})
    return _PutBatch(manifest, bodies, PutFiles(manifest, skip).frame())


class _InThread:
    """fn() running in a thread of its own; result() waits and re-raises its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._outcome: tuple[bool, Any] = (False, None)
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._outcome = (True, fn())
        except BaseException as exc:  # handed to the caller of result()
            self._outcome = (False, exc)

    def result(self) -> Any:
        self._thread.join()
        ok, value = self._outcome
        if not ok:
            raise value
        return value


def _read_small_file(path: str) -> bytes:
    """The bytes of one version of a small file. A file that changed while it was read
    is read once more; one that changed within SETTLE_NS is read twice and compared
    (a write that began before the first fstat shows nothing new in the second)."""
    for _ in range(2):
        body, before, after = _read_with_stats(path)
        if len(body) > BATCH_FILE_MAX:  # grew since the tree was listed: never cut it
            raise SourceChanged(f"source changed during transfer: {path} grew past "
                                f"{BATCH_FILE_MAX} bytes after the tree was listed; run "
                                "the command again")
        if file_version(before) != file_version(after) or len(body) != after.st_size:
            continue
        if is_settled(before):
            return body
        again, _, last = _read_with_stats(path)
        if again == body and file_version(last) == file_version(before):
            return body
    raise SourceChanged(f"source changed during transfer: {path} was modified while it "
                        "was read, twice; it was not sent")


def _read_with_stats(path: str) -> tuple[bytes, os.stat_result, os.stat_result]:
    """(up to BATCH_FILE_MAX + 1 bytes of path, its fstat before, its fstat after)."""
    try:
        with open(path, "rb", buffering=0) as fh:
            before = os.fstat(fh.fileno())
            body = fh.read(BATCH_FILE_MAX + 1)
            return body, before, os.fstat(fh.fileno())
    except OSError as exc:
        raise LocalError(f"cannot read {path}: {exc.strerror}") from None


def _join(base: str, rel: str) -> str:
    return f"{base}/{rel}" if base else rel


