"""Uploads into the root: partial files, their placement, the trash and the sweep.

State in `<root>/.filesrv/`:
  partials/<key>.part   single uploads in progress, locked by their writer (POSIX lock)
  partials/batch-*      put_files temporaries (see batches.py), swept once orphaned
  trash/                files replaced by an upload, deleted after its reply
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import stat
import struct
import time

import xxhash

from .digests import DigestCache
from .durability import Writeback
from .errors import Busy, IntegrityError, IoError, IsADirectory, NotFound
from .fileio import pwrite_all
from .hashing import hash_fd_range
from .root import ConfinedRoot, io_error

_TAKEOVER_WAIT = 5.0  # seconds a new upload waits for a superseded holder to let go
TAKEOVER_SIGNAL = signal.SIGUSR1
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux (64-bit off_t)
_TRASH_MAX_AGE = 60.0  # replaced files whose deletion was cut short, swept after this
BATCH_PREFIX = "batch-"  # put_files temporaries: batch-<token>-<index>.part, batch-<token>.lock


class Uploads:
    """Where uploads are received (partials/), placed, and what is left of them swept."""

    def __init__(self, root: ConfinedRoot, digests: DigestCache, buffer_size: int) -> None:
        self.root = root
        self.digests = digests
        self.buffer_size = buffer_size
        self.partials_fd = root.state_dir("partials")
        self.trash_fd = root.state_dir("trash")

    def begin(self, parts: tuple[str, ...], size: int, source: str) -> PartialUpload:
        """Claim (or take over) the partial for this path, size and source version."""
        if not parts:
            raise IsADirectory("the root is a directory")
        self._check_destination(parts)
        key = hashlib.sha256("\0".join(["/".join(parts), str(size), source]).encode()
                             ).hexdigest()[:40]
        return PartialUpload(self, parts, size, f"{key}.part")

    def _check_destination(self, parts: tuple[str, ...]) -> None:
        """Refuse before any byte moves if the final name cannot be a file."""
        try:
            parent_fd, name = self.root.resolve(parts)
        except NotFound:  # a missing parent: created when the file is placed
            return
        if name is None:
            os.close(parent_fd)
            raise IsADirectory(f"{'/'.join(parts)!r} is the root directory")
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        finally:
            os.close(parent_fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectory(f"{'/'.join(parts)!r} is a directory")

    def remove_stale_partials(self, max_age: float) -> list[str]:
        """Delete unlocked partial uploads untouched for `max_age` seconds, and empty ones
        at once (left by a crash before the first byte: nothing to resume); their names."""
        cutoff = time.time() - max_age
        with os.scandir(self.partials_fd) as it:
            names = [e.name for e in it]
        removed = self._remove_orphaned_batches(
            [n for n in names if n.startswith(BATCH_PREFIX)])
        for name in names:
            if name.startswith(BATCH_PREFIX) or not name.endswith(".part"):
                continue
            try:
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=self.partials_fd)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if st.st_mtime >= cutoff and st.st_size > 0:
                    continue
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # in use: OSError, skip
                if os.stat(name, dir_fd=self.partials_fd).st_ino == os.fstat(fd).st_ino:
                    os.unlink(name, dir_fd=self.partials_fd)
                    removed.append(name)
            except OSError:
                pass
            finally:
                os.close(fd)
        return removed

    def _remove_orphaned_batches(self, names: list[str]) -> list[str]:
        """Temporaries of put_files batches whose process is gone (no lock file, or one
        nobody holds): they can never be resumed. Their names, removed."""
        batches: dict[str, list[str]] = {}  # token: its temporaries
        for name in names:
            token = name[len(BATCH_PREFIX):].split("-", 1)[0].split(".", 1)[0]
            files = batches.setdefault(token, [])
            if name.endswith(".part"):
                files.append(name)
        removed = []
        for token, files in batches.items():
            lock_name = f"{BATCH_PREFIX}{token}.lock"
            try:
                lock_fd = os.open(lock_name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=self.partials_fd)
            except FileNotFoundError:
                lock_fd = -1  # created before its first temporary: its batch is over
            except OSError:
                continue
            try:
                if lock_fd >= 0:
                    fcntl.lockf(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: OSError
                for name in files:
                    try:
                        os.unlink(name, dir_fd=self.partials_fd)
                        removed.append(name)
                    except FileNotFoundError:
                        pass
                if lock_fd >= 0 and os.stat(lock_name, dir_fd=self.partials_fd,
                                            follow_symlinks=False).st_ino == \
                        os.fstat(lock_fd).st_ino:
                    os.unlink(lock_name, dir_fd=self.partials_fd)
            except OSError:
                pass
            finally:
                if lock_fd >= 0:
                    os.close(lock_fd)
        return removed

    def place(self, partial_name: str, parts: tuple[str, ...]) -> str | None:
        """Rename a finished partial to its final name, atomically and durably.

        A file it replaces keeps a link in trash/ so that the rename does not free
        its blocks (seconds for a big file on some disks); the caller deletes it
        with `empty_trash` once the client has its answer.  Returns that name.
        """
        parent_fd, name = self.root.resolve_entry(parts, create_parents=True)
        trashed = f"{partial_name}.{os.getpid()}.old"
        try:
            try:
                os.link(name, trashed, src_dir_fd=parent_fd, dst_dir_fd=self.trash_fd,
                        follow_symlinks=False)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                trashed = None  # nothing (or nothing linkable) to keep alive
            os.rename(partial_name, name, src_dir_fd=self.partials_fd, dst_dir_fd=parent_fd)
            os.fsync(parent_fd)
        except IsADirectoryError:
            raise IsADirectory(f"{'/'.join(parts)!r} is a directory") from None
        except OSError as exc:
            raise io_error(exc, "placing the file") from None
        finally:
            os.close(parent_fd)
        return trashed

    def empty_trash(self, name: str | None = None) -> None:
        """Delete one replaced file, or (name None) every one left by a cut-short child."""
        if name is not None:
            names = [name]
        else:
            cutoff = time.time() - _TRASH_MAX_AGE
            with os.scandir(self.trash_fd) as it:
                names = [e.name for e in it
                         if e.stat(follow_symlinks=False).st_ctime < cutoff]
        for n in names:
            try:
                os.unlink(n, dir_fd=self.trash_fd)
            except FileNotFoundError:
                pass


class PartialUpload:
    """An upload in progress: a locked partial file, verified before it is placed.

    The partial is keyed by path, size and the client's source tag, so a changed
    local file never resumes onto bytes of an older version.  A new connection
    for the same key takes over from a holder that is still alive (stalled, or
    abandoned by its client) by signalling it, rather than waiting for its
    idle timeout.
    """

    def __init__(self, uploads: Uploads, parts: tuple[str, ...], size: int, name: str) -> None:
        self.uploads = uploads
        self.parts = parts
        self.size = size
        self.name = name
        self.fd = self._claim()
        try:
            self.resume_offset = os.fstat(self.fd).st_size
            if self.resume_offset > size:  # cannot be ours: start over
                os.ftruncate(self.fd, 0)
                self.resume_offset = 0
            self.written = self.resume_offset
            self.writeback = Writeback(self.fd, self.resume_offset)
            self.trashed: str | None = None
            self.hasher = xxhash.xxh3_128()
            hash_fd_range(self.fd, 0, self.resume_offset, self.hasher,
                          bytearray(uploads.buffer_size))
        except OSError as exc:
            self.close()
            raise io_error(exc, "reading the partial upload") from None
        except BaseException:
            self.close()
            raise

    def _claim(self) -> int:
        pfd = self.uploads.partials_fd
        deadline = time.monotonic() + _TAKEOVER_WAIT
        signalled = 0
        while True:
            try:
                fd = os.open(self.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644, dir_fd=pfd)
            except OSError as exc:  # no space or no free inode: no_space, not a dropped line
                raise io_error(exc, "creating the partial upload") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _lock_holder(fd)
                os.close(fd)
                if holder and holder != signalled:
                    try:
                        os.kill(holder, TAKEOVER_SIGNAL)
                        signalled = holder
                    except ProcessLookupError:
                        pass
                if time.monotonic() > deadline:
                    raise Busy("another transfer of this file is in progress") from None
                time.sleep(0.02)
                continue
            # the lock is only meaningful on the file still linked at this name
            try:
                same = os.stat(self.name, dir_fd=pfd, follow_symlinks=False).st_ino == \
                    os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def write(self, data: memoryview) -> None:
        if self.written + len(data) > self.size:
            raise IoError("more bytes than announced")
        try:
            pwrite_all(self.fd, data, self.written)
        except OSError as exc:
            raise io_error(exc, "writing the upload") from None
        self.hasher.update(data)
        self.written += len(data)
        self.writeback.wrote_up_to(self.written)

    def commit(self, digest: str) -> str:
        """Verify, flush and place the file; returns the digest."""
        if self.written != self.size:
            raise IoError(f"upload has {self.written} of {self.size} bytes")
        actual = self.hasher.hexdigest()
        if actual != digest:
            self.discard()
            raise IntegrityError(
                f"XXH3-128 mismatch: received {actual}, client sent {digest}; "
                "the partial upload was discarded")
        try:
            self.writeback.finish()
            st = os.fstat(self.fd)
        except OSError as exc:
            raise io_error(exc, "flushing the upload") from None
        self.trashed = self.uploads.place(self.name, self.parts)
        self.uploads.digests.remember(st, actual, "/".join(self.parts))
        return actual

    def discard(self) -> None:
        try:
            os.unlink(self.name, dir_fd=self.uploads.partials_fd)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Release the lock; an unfinished partial stays for a later resume, an empty one
        (a put that never sent a byte) is removed: nothing to resume, an inode to keep."""
        if self.fd >= 0:
            self._remove_if_empty()
            os.close(self.fd)
            self.fd = -1

    def _remove_if_empty(self) -> None:
        # under our lock nobody else unlinks or replaces the name; after a commit or a
        # discard the name is gone or another upload's, which the identity check leaves be
        try:
            mine = os.fstat(self.fd)
            if mine.st_size == 0 and os.stat(self.name, dir_fd=self.uploads.partials_fd,
                                             follow_symlinks=False).st_ino == mine.st_ino:
                os.unlink(self.name, dir_fd=self.uploads.partials_fd)
        except OSError:
            pass

    def release_replaced(self) -> None:
        """Free the file this upload replaced (slow for big files: after the reply)."""
        if self.trashed is not None:
            self.uploads.empty_trash(self.trashed)
            self.trashed = None


def _lock_holder(fd: int) -> int:
    """PID of the process holding a POSIX write lock on fd, or 0 if none is visible."""
    query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    l_type, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return pid if l_type != fcntl.F_UNLCK else 0
