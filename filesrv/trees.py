"""Trees: put_tree and get_tree. Small files travel many to an exchange (put_files,
get_files) in batches, read ahead in a thread while the server works on the previous
batch, or requested ahead on download; larger files go one by one, resumable."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple

import xxhash

from .commands import join_path
from .errors import (ConnectionFailed, FilesrvError, LocalError, NotFound, ProtocolError,
                     SourceChanged)
from .local import (LocalPartial, existing_file, make_local_dir, place_and_close,
                    place_together, placement_target)
from .protocol import (MAX_BATCH_FILES, SKIP_EXISTING, SKIP_IDENTICAL, Data, Entry, GetFiles,
                       PutFiles, check_reply, normalize_path, parse_file_reply,
                       parse_failure, parse_need_reply, parse_path, parse_placed_reply)
from .sources import TreePlan, file_version, is_settled, plan_local_tree
from .transfer import (NO_CLOBBER, REPLACE, SMALL_BUFFER, UPDATE, FileTransfers, Progress,
                       RateLimiter, TransferClock, TransferResult, digest_mismatch)
from .transport import Channel

# Trees: files up to BATCH_FILE_MAX travel many to an exchange (put_files/get_files), in
# batches of up to BATCH_BYTES and MAX_BATCH_FILES files whose manifest stays under
# BATCH_MANIFEST_BYTES (the header limit is 64 KiB). Larger files go one by one, resumable.
BATCH_FILE_MAX = 1024 * 1024
BATCH_BYTES = 8 * 1024 * 1024
BATCH_MANIFEST_BYTES = 48 * 1024
DURABLE_BATCH_FILES = 256  # with --fsync a batch's partials stay open until one flush


class TreeTransfers(FileTransfers):
    """Directory trees over the connection, batched."""

    _sent_ahead: "_SentAhead | None" = None  # a get_files request sent with the previous batch

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
        small = [(os.path.join(local_dir, rel), join_path(base, rel), size)
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
                self.mkdir(join_path(base, rel), parents=True)
        results, done = _tree_report(progress, on_file)
        for i in range(len(batches)):
            prepared = reads.pop(i).result()
            clock = TransferClock(self, None)
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
            done(self.put(os.path.join(local_dir, rel), join_path(base, rel), progress=progress,
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
            if pending_bytes >= SMALL_BUFFER * 4:
                self._send(b"".join(pending))
                pending, pending_bytes = [], 0
        self._send(b"".join(pending))
        sent()
        failed = self._placed(len(manifest))
        if failed:
            index, error = min(failed.items())
            raise type(error)(f"{manifest[index]['path']}: {error.message}")
        seconds = time.monotonic() - started
        wanted = set(need)
        return [TransferResult(normalize_path(m["path"]), m["size"], 0, m["xxh128"], seconds,
                               i not in wanted, m["size"] if i in wanted else 0)
                for i, m in enumerate(manifest)]

    def _placed(self, count: int) -> dict[int, FilesrvError]:
        """put_files' last reply: the failures by index, chunked or (from a server that
        does not chunk) in the header."""
        header = self._reply(check_reply)
        with self._server_failures():
            if "failed" in header:
                return parse_placed_reply(header, count)
            return dict(parse_failure(item, count)
                        for items, _ in self._chunks(header) for item in items)

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
                small.append((join_path(base, entry.name), local, entry.size))
        per_batch = DURABLE_BATCH_FILES if self.durable else MAX_BATCH_FILES
        batches = list(_batches(small, per_batch))
        try:
            for i, batch in enumerate(batches):
                ahead = batches[i + 1] if i + 1 < len(batches) else None
                clock = TransferClock(self, None)
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
            done(self.get(join_path(base, entry.name), local, progress=progress, overwrite=policy))
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
                raise digest_mismatch(remote)
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
        body = read_small_file(local)
        bodies.append(body)
        manifest.append({"path": remote, "size": len(body),
                         "xxh128": xxhash.xxh3_128_hexdigest(body)})
    return _PutBatch(manifest, bodies, PutFiles(manifest, skip, chunked=True).frame())



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



def read_small_file(path: str) -> bytes:
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

