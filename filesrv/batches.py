"""put_files: many small files in one exchange, received and placed as a batch."""

from __future__ import annotations

import fcntl
import os
import stat
import time
from typing import Iterable

import xxhash

from .digests import DigestCache
from .durability import flush_filesystem
from .errors import FilesrvError, IoError, IsADirectory, NotFound
from .fileio import pwrite_all
from .protocol import SKIP_EXISTING
from .root import ConfinedRoot, ReadableFile, SymlinkAtName, io_error
from .uploads import BATCH_PREFIX, Uploads


class BatchUpload:
    """The files of one put_files request: received into partials/, flushed together,
    then each renamed to its name, then flushed together again (two syncfs a batch
    instead of an fsync and a directory fsync per file).

    A file never appears at its final name before its bytes are durable; a batch cut
    short leaves nothing but temporaries, which `discard` removes (or, after a crash,
    the sweep: temporaries cannot be resumed). While the batch lives it holds a POSIX
    lock on `batch-<token>.lock`, which tells the sweep of any replica sharing the root
    to leave its `batch-<token>-<index>.part` files alone.
    """

    def __init__(self, uploads: Uploads) -> None:
        self.uploads = uploads
        self.received: dict[int, tuple[str, tuple[str, ...]]] = {}
        self._temporaries: set[str] = set()  # created and not (yet) placed
        self._token = os.urandom(8).hex()  # unique across replicas, unlike a pid
        self._lock_fd = -1

    def _name(self, index: int) -> str:
        return f"{BATCH_PREFIX}{self._token}-{index}.part"

    def _hold_lock(self) -> None:
        """Create and lock this batch's lock file, before its first temporary."""
        name = f"{BATCH_PREFIX}{self._token}.lock"
        pfd = self.uploads.partials_fd
        for _ in range(5):  # the sweep may take a lock file in the instant before we lock it
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=pfd)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(name, dir_fd=pfd, follow_symlinks=False).st_ino == \
                        os.fstat(fd).st_ino:
                    self._lock_fd = fd
                    return
            except OSError:
                pass
            os.close(fd)
            time.sleep(0.01)
        raise IoError("could not lock the batch's temporaries")

    def receive(self, index: int, chunks: Iterable[memoryview]) -> str:
        """Write the bytes of the file at `index` of the request, as they arrive, into a
        new temporary; their XXH3-128."""
        name = self._name(index)
        try:
            if self._lock_fd < 0:
                self._hold_lock()
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=self.uploads.partials_fd)
        except OSError as exc:
            raise io_error(exc, "creating a file") from None
        self._temporaries.add(name)
        hasher = xxhash.xxh3_128()
        position = 0
        try:
            for chunk in chunks:
                hasher.update(chunk)
                try:
                    pwrite_all(fd, chunk, position)
                except OSError as exc:  # only the disk's: the chunks' own errors pass
                    raise io_error(exc, "writing a file") from None
                position += len(chunk)
        finally:
            os.close(fd)
        return hasher.hexdigest()

    def received_whole(self, index: int, parts: tuple[str, ...]) -> None:
        """The temporary of `index` holds all its bytes, verified."""
        self.received[index] = (self._name(index), parts)

    def place_all(self) -> dict[int, FilesrvError]:
        """Flush, rename every verified file to its name, flush; errors by index."""
        failed: dict[int, FilesrvError] = {}
        partials_fd = self.uploads.partials_fd
        try:
            flush_filesystem(partials_fd)
        except OSError as exc:
            error = io_error(exc, "flushing the files")
            return {index: error for index in self.received}
        parents: dict[tuple[str, ...], int] = {}  # files of a tree share directories
        try:
            for index, (name, parts) in self.received.items():
                try:
                    self._place_one(name, parts, parents)
                    self._temporaries.discard(name)
                except IsADirectoryError:
                    failed[index] = IsADirectory(f"{'/'.join(parts)!r} is a directory")
                except FilesrvError as exc:
                    failed[index] = exc
                except OSError as exc:
                    failed[index] = io_error(exc, "placing the file")
        finally:
            for fd in parents.values():
                os.close(fd)
        try:
            flush_filesystem(partials_fd)
        except OSError as exc:
            error = io_error(exc, "flushing the directories")
            failed.update({index: error for index in self.received if index not in failed})
        return failed

    def _place_one(self, name: str, parts: tuple[str, ...],
                   parents: dict[tuple[str, ...], int]) -> None:
        parent_fd = parents.get(parts[:-1])
        if parent_fd is None:  # the literal parent: never the target of a final symlink
            parent_fd, _ = self.uploads.root.resolve(parts, follow_last=False,
                                                     create_parents=True)
            parents[parts[:-1]] = parent_fd
        partials_fd = self.uploads.partials_fd
        try:
            is_link = stat.S_ISLNK(os.stat(parts[-1], dir_fd=parent_fd,
                                           follow_symlinks=False).st_mode)
        except FileNotFoundError:
            is_link = False
        if not is_link:
            os.rename(name, parts[-1], src_dir_fd=partials_fd, dst_dir_fd=parent_fd)
            return
        # a symlink inside the root: its target gets the bytes, as for a single put
        target_parent, final = self.uploads.root.resolve_entry(parts, create_parents=True)
        try:
            os.rename(name, final, src_dir_fd=partials_fd, dst_dir_fd=target_parent)
        finally:
            os.close(target_parent)

    def discard(self) -> None:
        """Remove what is left in partials/ (files that failed, or a batch cut short),
        then the lock file."""
        for name in self._temporaries:
            try:
                os.unlink(name, dir_fd=self.uploads.partials_fd)
            except FileNotFoundError:
                pass
        self._temporaries.clear()
        if self._lock_fd >= 0:
            try:
                os.unlink(f"{BATCH_PREFIX}{self._token}.lock", dir_fd=self.uploads.partials_fd)
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = -1


def lacking(root: ConfinedRoot, digests: DigestCache,
            files: dict[int, tuple[tuple[str, ...], int, str]], skip: str
            ) -> tuple[list[int], dict[int, FilesrvError]]:
    """put_files: which files (by index) must be sent, and which cannot be put.

    A name that holds a file to keep (skip SKIP_EXISTING: any file; else one with
    this size and digest) is not needed. Each directory is resolved once a batch.
    """
    need: list[int] = []
    failed: dict[int, FilesrvError] = {}
    parents: dict[tuple[str, ...], int | None] = {}  # None: not there (yet)
    try:
        for index, (parts, size, digest) in files.items():
            try:
                f = _open_kept(root, parts, parents)
            except NotFound:
                need.append(index)
                continue
            except FilesrvError as exc:
                failed[index] = exc
                continue
            try:
                if not (skip == SKIP_EXISTING
                        or (f.size == size and digests.digest_of(f) == digest)):
                    need.append(index)
            finally:
                f.close()
    finally:
        for fd in parents.values():
            if fd is not None:
                os.close(fd)
    return need, failed


def _open_kept(root: ConfinedRoot, parts: tuple[str, ...],
               parents: dict[tuple[str, ...], int | None]) -> ReadableFile:
    """open_for_read through a cache of resolved parent directories."""
    where = parts[:-1]
    if where not in parents:
        try:
            parents[where] = root.open_dir(where)
        except NotFound:
            parents[where] = None
    parent_fd = parents[where]
    if parent_fd is None:
        raise NotFound(f"no such file: {'/'.join(parts)!r}")
    try:
        return root.open_file_in(parent_fd, parts[-1], "/".join(parts))
    except SymlinkAtName:
        return root.open_file(parts)  # resolved (and confined) the long way
