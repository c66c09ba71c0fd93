"""Single-file transfers: get and put of one file, resumable and verified end to end,
with rate limiting, the checks that the source did not change, and their timing."""

from __future__ import annotations

import os
import stat
import time
from typing import Any, Callable, NamedTuple, TypeVar

import xxhash

from .commands import RemoteCommands
from .connection import server_failure
from .defaults import BUFFER_SIZE as DEFAULT_BUFFER_SIZE
from .errors import (ConnectionFailed, FilesrvError, IntegrityError, IsADirectory,
                     LocalError, LocalNoSpace, ProtocolError, SourceChanged)
from .hashing import hash_fd_range
from .local import (LocalPartial, StreamSink, file_digest, free_bytes, no_local_space,
                    writes_through)
from .protocol import (Commit, Data, Get, Put, normalize_path, parse_commit_reply,
                       parse_get_reply, parse_path, parse_put_reply)
from .sources import LocalSource, source_tag
from .transport import TornFrame, send_file

SMALL_BUFFER = 64 * 1024      # enough for small files; allocating 1 MiB costs ~0.1 ms
RESUMABLE_BODY = 1024 * 1024  # smaller downloads are not worth a resume record

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



class TransferClock:
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



def digest_mismatch(remote: str) -> IntegrityError:
    return IntegrityError(f"{remote}: XXH3-128 of the received bytes does not match the "
                          "server's; the partial was discarded")



class FileTransfers(RemoteCommands):
    """get and put of single files over the connection, with the client's buffers,
    rate limit and durability."""

    def __init__(self, host: str, port: int, *, buffer_size: int = DEFAULT_BUFFER_SIZE,
                 limit_rate: float | None = None, durable: bool = False,
                 **connection: Any) -> None:
        """connection: Connection's options."""
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        super().__init__(host, port, **connection)
        self.buffer_size = buffer_size
        self.limit_rate = limit_rate
        self.durable = durable  # fsync each downloaded file before it takes its name
        self._buffers: dict[int, bytearray] = {}

    def _buffer(self, needed: int) -> bytearray:
        """A reusable buffer for `needed` bytes: small transfers do not pay for a big one."""
        size = self.buffer_size if needed > SMALL_BUFFER else min(self.buffer_size,
                                                                    SMALL_BUFFER)
        buffer = self._buffers.get(size)
        if buffer is None:
            buffer = self._buffers[size] = bytearray(size)
        return buffer

    # ------------------------------------------------------------ get

    def get(self, remote: str, local: str, *, progress: Progress | None = None,
            overwrite: str = REPLACE) -> TransferResult:
        """Download `remote` to the file `local`, resuming a partial left beside it.

        The partial is renamed to `local` only after the whole-file digest matched.
        overwrite: REPLACE (default), NO_CLOBBER (keep an existing `local`), UPDATE
        (skip when `local` already has the remote digest).
        """
        parse_path(remote)
        clock = TransferClock(self, progress)
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

    def _get_through(self, remote: str, local: str, clock: "TransferClock") -> TransferResult:
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
            raise digest_mismatch(remote)
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
                raise no_local_space(partial, length, free)
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
                                     free_bytes(partial.folder) or 0) from None
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
        clock = TransferClock(self, progress)
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

    def _put_one_version(self, fd: int, local: str, remote: str, clock: "TransferClock"
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

    def _put_version(self, source: "LocalSource", remote: str, clock: "TransferClock"
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
        try:
            sent = send_file(self.channel.sock, fd, position, count)
        except OSError as exc:
            self._raise_pending_error(exc)
        if sent != count:
            self.close()
            raise SourceChanged("the local file shrank while it was being sent")
