"""The one object the daemon's handlers ask about files (as pyftpdlib's AbstractedFS).

It reads and manages the root itself, and hands the rest to the rooms that own it:
  root.py      ConfinedRoot: path resolution, confined to the root; opening files
  listing.py   directory listings and tree walks, yielded sorted
  digests.py   DigestCache: XXH3-128 of served files, kept across connections
  uploads.py   Uploads, PartialUpload: partials, placement, the trash, the stale sweep
  batches.py   BatchUpload: put_files, received and placed as a batch
Only these modules touch the root, and all but root.py reach it through ConfinedRoot.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Callable, Iterable, Iterator

import xxhash

from . import defaults
from .batches import BatchUpload, lacking
from .digests import DIGEST_CACHE_MAX, DigestCache
from .errors import (AlreadyExists, BadPath, FilesrvError, IoError, IsADirectory,
                     NotADirectory, NotFound)
from .listing import iter_dir
from .protocol import Entry
from .root import ConfinedRoot, DirWalk, ReadableFile, io_error
from .uploads import TAKEOVER_SIGNAL, PartialUpload, Uploads

__all__ = ["Storage", "ReadableFile", "PartialUpload", "BatchUpload", "TAKEOVER_SIGNAL",
           "io_error"]


class Storage:
    """Owns the served root; all access to it goes through here."""

    def __init__(self, root: str, buffer_size: int = defaults.BUFFER_SIZE) -> None:
        self.confined = ConfinedRoot(root)
        self.root = self.confined.path
        self.buffer_size = buffer_size
        self.digests = DigestCache(self.confined, buffer_size)
        self.uploads = Uploads(self.confined, self.digests, buffer_size)

    # ------------------------------------------------------------ reading

    def open_for_read(self, parts: tuple[str, ...]) -> ReadableFile:
        return self.confined.open_file(parts)

    def digest_of(self, f: ReadableFile) -> str:
        """Whole-file XXH3-128, from the cache when this version was hashed before."""
        return self.digests.digest_of(f)

    def read_small(self, f: ReadableFile) -> tuple[bytes, str]:
        """A small file's bytes and their XXH3-128 from a single read."""
        data = os.pread(f.fd, f.size, 0)
        if len(data) != f.size:
            raise IoError(f"the file shrank while it was read ({len(data)} of {f.size} bytes)")
        return data, xxhash.xxh3_128_hexdigest(data)

    def prune_digests(self, max_entries: int = DIGEST_CACHE_MAX) -> int:
        """The digest cache's sweep (see DigestCache.prune); how many entries went."""
        return self.digests.prune(max_entries)

    # ------------------------------------------------------------ listing

    def list_dir(self, parts: tuple[str, ...], recursive: bool = False,
                 on_skip: Callable[[str], None] | None = None) -> list[Entry]:
        """iter_dir's entries, all at once."""
        return list(self.iter_dir(parts, recursive, on_skip))

    def iter_dir(self, parts: tuple[str, ...], recursive: bool = False,
                 on_skip: Callable[[str], None] | None = None) -> Iterator[Entry]:
        """Entries of one directory, or (recursive) of its tree, sorted, as the walk goes
        (see listing.iter_dir)."""
        return iter_dir(self.confined, parts, recursive, on_skip)

    def spool(self, pieces: Iterable[bytes]) -> tuple[int, int]:
        """`pieces` written to an anonymous file on the root's disk (gone once closed):
        (its fd, the caller's to close, and its length). For what must be sent with
        its length in front but must not sit in memory (a listing in one body)."""
        try:
            fd = os.open(".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600,
                         dir_fd=self.uploads.partials_fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise io_error(exc, "creating a spool file") from None
            fd = self._unlinked_file()  # a file system without O_TMPFILE
        try:
            with os.fdopen(os.dup(fd), "wb", closefd=True) as out:  # buffered writes
                for piece in pieces:
                    out.write(piece)
                length = out.tell()
        except OSError as exc:
            os.close(fd)
            raise io_error(exc, "spooling a reply") from None
        except BaseException:
            os.close(fd)
            raise
        return fd, length

    def _unlinked_file(self) -> int:
        name = f"spool-{os.getpid()}-{time.monotonic_ns()}.tmp"
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600, dir_fd=self.uploads.partials_fd)
            os.unlink(name, dir_fd=self.uploads.partials_fd)
        except OSError as exc:
            raise io_error(exc, "creating a spool file") from None
        return fd

    # ------------------------------------------------------------ management

    def stat_entry(self, parts: tuple[str, ...], follow: bool = True
                   ) -> tuple[str, os.stat_result]:
        """("file" | "dir" | "link" | "other", stat) of a path inside the root."""
        return self.confined.stat_entry(parts, follow)

    def remove(self, parts: tuple[str, ...], recursive: bool) -> int:
        """Delete a file, a symlink (not its target) or, if recursive, a tree; the count."""
        if not parts:
            raise BadPath("refusing to remove the root")
        parent_fd, name = self.confined.resolve_entry(parts, follow_last=False)
        shown = "/".join(parts)
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=parent_fd)
                return 1
            if not recursive:
                raise IsADirectory(f"{shown!r} is a directory (remove it with -r)")
            return _remove_tree(parent_fd, name)
        except FileNotFoundError:
            raise NotFound(f"no such file or directory: {shown!r}") from None
        except OSError as exc:
            raise io_error(exc, f"removing {shown!r}") from None
        finally:
            os.close(parent_fd)

    def move(self, src: tuple[str, ...], dst: tuple[str, ...]) -> None:
        """Rename within the root, atomically; an existing file at dst is replaced."""
        if not src or not dst:
            raise BadPath("the root cannot be moved or replaced")
        if dst[: len(src)] == src:
            raise BadPath("cannot move a directory into itself")
        src_fd, src_name = self.confined.resolve_entry(src, follow_last=False)
        try:
            dst_fd, dst_name = self.confined.resolve_entry(dst, follow_last=False)
            try:
                try:
                    existing = os.stat(dst_name, dir_fd=dst_fd, follow_symlinks=False)
                    if stat.S_ISDIR(existing.st_mode):
                        raise IsADirectory(f"{'/'.join(dst)!r} is a directory")
                except FileNotFoundError:
                    pass
                os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                os.fsync(dst_fd)
            finally:
                os.close(dst_fd)
        except FileNotFoundError:
            raise NotFound(f"no such file or directory: {'/'.join(src)!r}") from None
        except NotADirectoryError:
            raise NotADirectory(f"cannot replace a file with a directory: {'/'.join(dst)!r}"
                                ) from None
        except OSError as exc:
            raise io_error(exc, "moving") from None
        finally:
            os.close(src_fd)

    def make_dir(self, parts: tuple[str, ...], parents: bool) -> None:
        if not parts:
            if parents:
                return
            raise AlreadyExists("the root exists")
        parent_fd, name = self.confined.resolve(parts, create_parents=parents)
        if name is None:  # a symlink back to the root: it exists
            os.close(parent_fd)
            if parents:
                return
            raise AlreadyExists(f"{'/'.join(parts)!r} already exists (the root)")
        try:
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=parent_fd)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectory(f"{'/'.join(parts)!r} exists and is not a directory"
                                    ) from None
            if not parents:
                raise AlreadyExists(f"{'/'.join(parts)!r} already exists") from None
        except OSError as exc:
            raise io_error(exc, "creating a directory") from None
        finally:
            os.close(parent_fd)

    # ------------------------------------------------------------ uploads

    def begin_upload(self, parts: tuple[str, ...], size: int, source: str) -> PartialUpload:
        """Claim (or take over) the partial for this path, size and source version."""
        return self.uploads.begin(parts, size, source)

    def lacking(self, files: dict[int, tuple[tuple[str, ...], int, str]], skip: str
                ) -> tuple[list[int], dict[int, FilesrvError]]:
        """put_files: which files (by index) must be sent, and which cannot be put."""
        return lacking(self.confined, self.digests, files, skip)

    def begin_batch(self) -> BatchUpload:
        return BatchUpload(self.uploads)

    def remove_stale_partials(self, max_age: float) -> list[str]:
        """The stale sweep of partials/ (see Uploads.remove_stale_partials)."""
        return self.uploads.remove_stale_partials(max_age)

    def empty_trash(self, name: str | None = None) -> None:
        """Delete one replaced file, or (name None) every one left by a cut-short child."""
        self.uploads.empty_trash(name)



def _remove_tree(parent_fd: int, name: str) -> int:
    """Delete a directory tree through directory fds (no symlink is ever followed).

    Depth first with one directory open at a time (plus the caller's parent_fd), so
    neither a wide nor a deep tree can run the process out of descriptors.
    """
    count = 0
    walk = DirWalk(parent_fd)
    try:
        walk.down(name)
        pending: list[list[str]] = []  # per directory on the way down: subdirectories left
        entered = True
        while True:
            if entered:
                subdirs, unlinked = _clear_files(walk.fd)
                pending.append(subdirs)
                count += unlinked
            while pending and not pending[-1]:
                pending.pop()
                done = walk.name
                walk.up()
                os.rmdir(done, dir_fd=walk.fd)
                count += 1
            if not pending:
                return count
            try:
                walk.down(pending[-1].pop())
                entered = True
            except FileNotFoundError:  # removed by someone else meanwhile
                entered = False
    finally:
        walk.close()


def _clear_files(dir_fd: int) -> tuple[list[str], int]:
    """Unlink everything in a directory but its subdirectories: (their names, unlinked)."""
    subdirs = []
    with os.scandir(dir_fd) as it:
        items = list(it)
    for item in items:
        if item.is_dir(follow_symlinks=False):
            subdirs.append(item.name)
        else:
            os.unlink(item.name, dir_fd=dir_fd)
    return subdirs, len(items) - len(subdirs)
