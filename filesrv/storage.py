"""The served root: path confinement, partial uploads, atomic placement, locks, digests.

Every path a client names is resolved here, one component at a time, relative
to directory handles already held (`dir_fd` + `O_NOFOLLOW`), so neither `..`
nor a symlink (even one swapped in mid-transfer) can lead a read or a write out
of the root.  Symlinks inside the root are followed as long as they stay in it.

Server state lives in `<root>/.filesrv/` (never listed, never served):
  partials/<key>.part   uploads in progress, locked by their writer (POSIX lock)
  digests/<dev>-<ino>   XXH3-128 of served files, keyed by file identity
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import stat
import struct
import time
from typing import Callable, Iterable, Iterator, NamedTuple

import xxhash

from .errors import (AlreadyExists, BadPath, Busy, FilesrvError, IntegrityError, IoError,
                     IsADirectory, NoSpace, NotADirectory, NotFound)
from .durability import Writeback, flush_filesystem
from .hashing import hash_fd_range
from .protocol import RESERVED_NAME, SKIP_EXISTING, Entry

_MAX_SYMLINK_HOPS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TAKEOVER_WAIT = 5.0  # seconds a new upload waits for a superseded holder to let go
TAKEOVER_SIGNAL = signal.SIGUSR1
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux (64-bit off_t)
_UNCACHED_DIGEST = 1024 * 1024  # below this, hashing is cheaper than a cache lookup
_TRASH_MAX_AGE = 60.0  # replaced files whose deletion was cut short, swept after this
_DIGEST_CACHE_MAX = 20_000  # entries kept by each sweep (each one a file of 1 MiB or more)
_BATCH_PREFIX = "batch-"  # put_files temporaries: batch-<token>-<index>.part, batch-<token>.lock


def io_error(exc: OSError, what: str) -> FilesrvError:
    """Map an OSError raised while touching storage to the protocol's error."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"no space left on the server while {what}")
    return IoError(f"I/O error while {what}: {exc.strerror}")


class _SymlinkAtName(Exception):
    """The final name is a symlink (open_for_read resolves it; a cached parent cannot)."""


class ReadableFile(NamedTuple):
    """A regular file opened for serving; `etag` names this version of it."""

    fd: int
    size: int
    etag: str
    identity: tuple[int, int, int, int]
    path: str = ""  # as the client named it: where the digest cache's sweep looks again

    def close(self) -> None:
        os.close(self.fd)


class Storage:
    """Owns the served root; all access to it goes through here."""

    def __init__(self, root: str, buffer_size: int = 1024 * 1024) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = os.path.realpath(root)
        self.buffer_size = buffer_size
        self.root_fd = os.open(self.root, _DIR_FLAGS)
        self.state_fd = self._ensure_dir(self.root_fd, RESERVED_NAME)
        state = os.fstat(self.state_fd)
        self.state_identity = (state.st_dev, state.st_ino)  # hidden by identity, not name
        self.partials_fd = self._ensure_dir(self.state_fd, "partials")
        self.digests_fd = self._ensure_dir(self.state_fd, "digests")
        self.trash_fd = self._ensure_dir(self.state_fd, "trash")

    @staticmethod
    def _ensure_dir(parent_fd: int, name: str) -> int:
        try:
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        except FileExistsError:
            pass
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)

    # ------------------------------------------------------------ resolution

    def _resolve(self, parts: tuple[str, ...], *, follow_last: bool = True,
                 create_parents: bool = False, missing_parents_ok: bool = False
                 ) -> tuple[int, str | None] | None:
        """Walk `parts` from the root: (fd of the parent directory, final name).

        The final name is None only for the root itself (also when a symlink such as
        `here -> .` leads back to it); a path that ends in a directory reached through
        a symlink (`d/`, `.`) is named in its parent like any other.  Symlinks are
        spliced in and must stay inside the root.  With `missing_parents_ok`, a missing
        parent directory returns None instead of raising NotFound.  Only one directory
        is held open at a time.  The caller closes the returned fd.
        """
        walk = _DirWalk(self.root_fd)
        todo = list(parts)
        hops = 0
        try:
            while todo:
                name = todo.pop(0)
                if name in ("", "."):
                    continue
                if name == "..":
                    if walk.depth == 0:
                        raise BadPath("path leads outside the root")
                    walk.up()
                    continue
                if walk.depth == 0 and name == RESERVED_NAME:
                    raise BadPath(f"{RESERVED_NAME!r} is reserved for the server")
                is_last = not todo
                try:
                    st = os.stat(name, dir_fd=walk.fd, follow_symlinks=False)
                except FileNotFoundError:
                    if is_last:
                        return walk.release(), name
                    if create_parents:
                        self._mkdir(walk.fd, name)
                        walk.down(name)
                        continue
                    if missing_parents_ok:
                        return None
                    raise NotFound(f"no such directory: {name!r}") from None
                except NotADirectoryError:
                    raise NotADirectory("a parent in the path is not a directory") from None
                if (st.st_dev, st.st_ino) == self.state_identity:  # e.g. reached by a bind mount
                    raise BadPath(f"{RESERVED_NAME!r} is reserved for the server")
                if stat.S_ISLNK(st.st_mode) and (follow_last or not is_last):
                    hops += 1
                    if hops > _MAX_SYMLINK_HOPS:
                        raise BadPath("too many levels of symbolic links")
                    target = os.readlink(name, dir_fd=walk.fd)
                    if target.startswith("/"):
                        target = self._inside_root(target)
                        walk.restart()
                    todo[:0] = target.split("/")
                    continue
                if is_last:
                    return walk.release(), name
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectory(f"{name!r} in the path is not a directory")
                try:
                    walk.down(name, st)
                except NotADirectoryError:  # swapped for a symlink or file since the stat
                    raise BadPath(f"{name!r} changed while the path was resolved") from None
            if walk.depth == 0:
                return walk.release(), None
            # ended in a directory through a symlink or "..": its name in its parent
            name = walk.name
            walk.up()
            return walk.release(), name
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # swapped for a symlink since the stat
                raise BadPath("a directory in the path changed while it was resolved"
                              ) from None
            raise io_error(exc, "resolving a path") from None
        finally:
            walk.close()

    def _resolve_entry(self, parts: tuple[str, ...], **options: bool) -> tuple[int, str]:
        """_resolve for a path that must name an entry of a directory: IsADirectory when
        it leads back to the root itself (a symlink to `.`)."""
        resolved = self._resolve(parts, **options)
        assert resolved is not None
        parent_fd, name = resolved
        if name is None:
            os.close(parent_fd)
            raise IsADirectory(f"{'/'.join(parts)!r} is the root directory")
        return parent_fd, name

    def _inside_root(self, target: str) -> str:
        rel = os.path.relpath(os.path.normpath(target), self.root)
        if rel == "." :
            return ""
        if rel == ".." or rel.startswith("../"):
            raise BadPath("a symlink in the path leads outside the root")
        return rel

    @staticmethod
    def _mkdir(parent_fd: int, name: str) -> None:
        try:
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        except FileExistsError:
            pass

    def _open_dir(self, parts: tuple[str, ...]) -> int:
        resolved = self._resolve(parts)
        assert resolved is not None
        parent_fd, name = resolved
        if name is None:
            return parent_fd
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            raise NotFound(f"no such directory: {'/'.join(parts)!r}") from None
        except NotADirectoryError:
            raise NotADirectory(f"not a directory: {'/'.join(parts)!r}") from None
        finally:
            os.close(parent_fd)

    # ------------------------------------------------------------ reading

    def open_for_read(self, parts: tuple[str, ...]) -> ReadableFile:
        if not parts:
            raise IsADirectory("the root is a directory")
        parent_fd, name = self._resolve_entry(parts)
        try:
            return self._open_readable(parent_fd, name, "/".join(parts))
        except _SymlinkAtName:  # _resolve followed the link: a new one appeared since
            raise BadPath(f"{'/'.join(parts)!r} changed while the path was resolved"
                          ) from None
        finally:
            os.close(parent_fd)

    @staticmethod
    def _open_readable(parent_fd: int, name: str, shown: str) -> ReadableFile:
        """The regular file `name` in parent_fd, never through a symlink."""
        try:
            # O_NONBLOCK: opening a FIFO someone placed in the root must not hang us
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=parent_fd)
        except FileNotFoundError:
            raise NotFound(f"no such file: {shown!r}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _SymlinkAtName(shown) from None
            raise io_error(exc, "opening a file") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectory(f"{shown!r} is a directory")
            raise BadPath(f"{shown!r} is not a regular file")
        os.set_blocking(fd, True)
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return ReadableFile(fd=fd, size=st.st_size, etag="%x-%x-%x-%x" % identity,
                            identity=identity, path=shown)

    def digest_of(self, f: ReadableFile) -> str:
        """Whole-file XXH3-128, from the cache when this version was hashed before."""
        cacheable = f.size >= _UNCACHED_DIGEST  # below it, hashing beats a cache lookup
        if cacheable:
            cached = self._cached_digest(f.identity)
            if cached is not None:
                return cached
        hasher = xxhash.xxh3_128()
        hash_fd_range(f.fd, 0, f.size, hasher, bytearray(min(self.buffer_size, f.size)))
        digest = hasher.hexdigest()
        st = os.fstat(f.fd)
        if cacheable and (st.st_size, st.st_mtime_ns) == f.identity[2:]:  # unchanged meanwhile
            self.store_digest(f.identity, digest, f.path)
        return digest

    def read_small(self, f: ReadableFile) -> tuple[bytes, str]:
        """A small file's bytes and their XXH3-128 from a single read."""
        data = os.pread(f.fd, f.size, 0)
        if len(data) != f.size:
            raise IoError(f"the file shrank while it was read ({len(data)} of {f.size} bytes)")
        return data, xxhash.xxh3_128_hexdigest(data)

    def _cached_digest(self, identity: tuple[int, int, int, int]) -> str | None:
        dev, ino, size, mtime_ns = identity
        try:
            with open(f"{dev:x}-{ino:x}", "rb", opener=self._digest_opener) as fh:
                record = json.loads(fh.read())
            if record["size"] == size and record["mtime_ns"] == mtime_ns:
                return str(record["xxh128"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def store_digest(self, identity: tuple[int, int, int, int], digest: str,
                     path: str) -> None:
        """Best effort: a lost or torn cache entry only costs a re-hash. `path` is where
        the file was (the sweep prunes the entry once no such file is there)."""
        dev, ino, size, mtime_ns = identity
        name = f"{dev:x}-{ino:x}"
        tmp = f"{name}.{os.getpid()}.tmp"
        record = json.dumps({"size": size, "mtime_ns": mtime_ns, "xxh128": digest,
                             "path": path}, ensure_ascii=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644,
                         dir_fd=self.digests_fd)
            try:
                os.write(fd, record.encode())
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=self.digests_fd, dst_dir_fd=self.digests_fd)
        except OSError:
            pass

    def _digest_opener(self, name: str, flags: int) -> int:
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=self.digests_fd)

    def prune_digests(self, max_entries: int = _DIGEST_CACHE_MAX) -> int:
        """The sweep of the digest cache: drop the entries of files deleted, changed or
        moved since they were hashed (looked up again at the path they had), writes cut
        short, and beyond `max_entries` the oldest. How many were dropped."""
        cutoff = time.time() - _TRASH_MAX_AGE
        kept: list[tuple[float, str]] = []
        dropped = 0
        with os.scandir(self.digests_fd) as it:
            names = [e.name for e in it]
        for name in names:
            try:
                written = os.stat(name, dir_fd=self.digests_fd, follow_symlinks=False).st_mtime
            except OSError:
                continue
            if name.endswith(".tmp"):
                current = written >= cutoff  # still being written, or left by a crash
            else:
                current = self._digest_entry_current(name)
                if current:
                    kept.append((written, name))
            if not current:
                dropped += self._drop_digest(name)
        kept.sort()
        for _, name in kept[: max(0, len(kept) - max_entries)]:
            dropped += self._drop_digest(name)
        return dropped

    def _digest_entry_current(self, name: str) -> bool:
        """The file the entry was written for is still at its path, unchanged."""
        try:
            with open(name, "rb", opener=self._digest_opener) as fh:
                record = json.loads(fh.read(64 * 1024))
            path = record["path"]
            kind, st = self.stat_entry(tuple(path.split("/")))
            return (kind == "file" and name == f"{st.st_dev:x}-{st.st_ino:x}"
                    and (st.st_size, st.st_mtime_ns) == (record["size"], record["mtime_ns"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, FilesrvError):
            return False  # gone, changed, unreadable, or an entry from before paths were kept

    def _drop_digest(self, name: str) -> int:
        try:
            os.unlink(name, dir_fd=self.digests_fd)
            return 1
        except OSError:
            return 0

    # ------------------------------------------------------------ listing

    def list_dir(self, parts: tuple[str, ...], recursive: bool = False,
                 on_skip: Callable[[str], None] | None = None) -> list[Entry]:
        """Entries of one directory, or (recursive) of its whole tree with relative names.

        A recursive walk does not descend into symlinked directories (no cycles). Each
        subdirectory is opened from its parent's fd (O_NOFOLLOW), not resolved again from
        the root, and only one directory is held open however deep the tree. A name that
        is not valid UTF-8 cannot be sent: it is left out (a directory with all it holds)
        and `on_skip` is told, with the name escaped.
        """
        entries: list[Entry] = []
        top_fd = self._open_dir(parts)
        try:
            walk = _DirWalk(top_fd)
        finally:
            os.close(top_fd)
        try:
            # depth first; for each directory on the way down, its subdirectories to visit
            pending = [self._list_one(parts, walk.fd, "", entries, on_skip)]
            if not recursive:
                pending[0] = []
            where = list(parts)
            while pending:
                if not pending[-1]:
                    pending.pop()
                    if walk.depth:
                        walk.up()
                        where.pop()
                    continue
                name = pending[-1].pop()
                try:
                    walk.down(name)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # removed since it was listed
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        continue  # replaced by a symlink since it was listed
                    raise
                where.append(name)
                prefix = "/".join(where[len(parts):]) + "/"
                pending.append(self._list_one(tuple(where), walk.fd, prefix, entries, on_skip))
        except OSError as exc:  # e.g. a directory the daemon may not read: say so
            raise io_error(exc, "listing a directory") from None
        finally:
            walk.close()
        entries.sort(key=lambda e: e.name)
        return entries

    def _list_one(self, parts: tuple[str, ...], dir_fd: int, prefix: str,
                  entries: list[Entry], on_skip: Callable[[str], None] | None) -> list[str]:
        """Append one directory's entries (names after `prefix`); its real subdirectories."""
        subdirs = []
        with os.scandir(dir_fd) as it:
            for item in it:
                if item.name == RESERVED_NAME and self._is_state_dir(item):
                    continue  # also when the root is listed through a symlink to it
                if not _is_utf8(item.name):
                    if on_skip is not None:
                        on_skip(prefix + item.name.encode("utf-8", "surrogateescape")
                                .decode("ascii", "backslashreplace"))
                    continue
                entry = self._entry(parts, item, prefix + item.name)
                if entry is None:
                    continue
                entries.append(entry)
                if entry.type == "dir" and item.is_dir(follow_symlinks=False):
                    subdirs.append(item.name)
        subdirs.reverse()  # visited by pop(): in the order they were read
        return subdirs

    def _is_state_dir(self, item: os.DirEntry) -> bool:
        try:
            st = item.stat(follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.state_identity

    def _entry(self, parts: tuple[str, ...], item: os.DirEntry, name: str) -> Entry | None:
        try:
            st = item.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                st = self.stat_entry(parts + (item.name,))[1]
        except (OSError, FilesrvError):
            return None  # dangling, or leading outside the root: not ours to show
        if stat.S_ISDIR(st.st_mode):
            return Entry(name, "dir", 0, st.st_mtime)
        if stat.S_ISREG(st.st_mode):
            return Entry(name, "file", st.st_size, st.st_mtime)
        return None

    # ------------------------------------------------------------ management

    def stat_entry(self, parts: tuple[str, ...], follow: bool = True
                   ) -> tuple[str, os.stat_result]:
        """("file" | "dir" | "link" | "other", stat) of a path inside the root."""
        resolved = self._resolve(parts, follow_last=follow)
        assert resolved is not None
        parent_fd, name = resolved
        try:
            st = os.fstat(parent_fd) if name is None else \
                os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise NotFound(f"no such file or directory: {'/'.join(parts)!r}") from None
        finally:
            os.close(parent_fd)
        kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                else "link" if stat.S_ISLNK(st.st_mode) else "other")
        return kind, st

    def remove(self, parts: tuple[str, ...], recursive: bool) -> int:
        """Delete a file, a symlink (not its target) or, if recursive, a tree; the count."""
        if not parts:
            raise BadPath("refusing to remove the root")
        parent_fd, name = self._resolve_entry(parts, follow_last=False)
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
        src_fd, src_name = self._resolve_entry(src, follow_last=False)
        try:
            dst_fd, dst_name = self._resolve_entry(dst, follow_last=False)
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
        resolved = self._resolve(parts, create_parents=parents)
        assert resolved is not None
        parent_fd, name = resolved
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

    def begin_upload(self, parts: tuple[str, ...], size: int, source: str) -> "PartialUpload":
        """Claim (or take over) the partial for this path, size and source version."""
        if not parts:
            raise IsADirectory("the root is a directory")
        self._check_destination(parts)
        key = hashlib.sha256("\0".join(["/".join(parts), str(size), source]).encode()
                             ).hexdigest()[:40]
        return PartialUpload(self, parts, size, f"{key}.part")

    def lacking(self, files: dict[int, tuple[tuple[str, ...], int, str]], skip: str
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
                    f = self._open_kept(parts, parents)
                except NotFound:
                    need.append(index)
                    continue
                except FilesrvError as exc:
                    failed[index] = exc
                    continue
                try:
                    if not (skip == SKIP_EXISTING
                            or (f.size == size and self.digest_of(f) == digest)):
                        need.append(index)
                finally:
                    f.close()
        finally:
            for fd in parents.values():
                if fd is not None:
                    os.close(fd)
        return need, failed

    def _open_kept(self, parts: tuple[str, ...],
                   parents: dict[tuple[str, ...], int | None]) -> ReadableFile:
        """open_for_read through a cache of resolved parent directories."""
        where = parts[:-1]
        if where not in parents:
            try:
                parents[where] = self._open_dir(where)
            except NotFound:
                parents[where] = None
        parent_fd = parents[where]
        if parent_fd is None:
            raise NotFound(f"no such file: {'/'.join(parts)!r}")
        try:
            return self._open_readable(parent_fd, parts[-1], "/".join(parts))
        except _SymlinkAtName:
            return self.open_for_read(parts)  # resolved (and confined) the long way

    def begin_batch(self) -> "BatchUpload":
        return BatchUpload(self)

    def _check_destination(self, parts: tuple[str, ...]) -> None:
        """Refuse before any byte moves if the final name cannot be a file."""
        resolved = self._resolve(parts, missing_parents_ok=True)
        if resolved is None:
            return
        parent_fd, name = resolved
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
            [n for n in names if n.startswith(_BATCH_PREFIX)])
        for name in names:
            if name.startswith(_BATCH_PREFIX) or not name.endswith(".part"):
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
            token = name[len(_BATCH_PREFIX):].split("-", 1)[0].split(".", 1)[0]
            files = batches.setdefault(token, [])
            if name.endswith(".part"):
                files.append(name)
        removed = []
        for token, files in batches.items():
            lock_name = f"{_BATCH_PREFIX}{token}.lock"
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
        parent_fd, name = self._resolve_entry(parts, create_parents=True)
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

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.received: dict[int, tuple[str, tuple[str, ...]]] = {}
        self._temporaries: set[str] = set()  # created and not (yet) placed
        self._token = os.urandom(8).hex()  # unique across replicas, unlike a pid
        self._lock_fd = -1

    def _name(self, index: int) -> str:
        return f"{_BATCH_PREFIX}{self._token}-{index}.part"

    def _hold_lock(self) -> None:
        """Create and lock this batch's lock file, before its first temporary."""
        name = f"{_BATCH_PREFIX}{self._token}.lock"
        pfd = self.storage.partials_fd
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
                         | os.O_CLOEXEC, 0o644, dir_fd=self.storage.partials_fd)
        except OSError as exc:
            raise io_error(exc, "creating a file") from None
        self._temporaries.add(name)
        hasher = xxhash.xxh3_128()
        position = 0
        try:
            for chunk in chunks:
                hasher.update(chunk)
                _write_all(fd, chunk, position, "writing a file")
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
        partials_fd = self.storage.partials_fd
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
            resolved = self.storage._resolve(parts, follow_last=False, create_parents=True)
            assert resolved is not None
            parent_fd = parents[parts[:-1]] = resolved[0]
        partials_fd = self.storage.partials_fd
        try:
            is_link = stat.S_ISLNK(os.stat(parts[-1], dir_fd=parent_fd,
                                           follow_symlinks=False).st_mode)
        except FileNotFoundError:
            is_link = False
        if not is_link:
            os.rename(name, parts[-1], src_dir_fd=partials_fd, dst_dir_fd=parent_fd)
            return
        # a symlink inside the root: its target gets the bytes, as for a single put
        target_parent, final = self.storage._resolve_entry(parts, create_parents=True)
        try:
            os.rename(name, final, src_dir_fd=partials_fd, dst_dir_fd=target_parent)
        finally:
            os.close(target_parent)

    def discard(self) -> None:
        """Remove what is left in partials/ (files that failed, or a batch cut short),
        then the lock file."""
        for name in self._temporaries:
            try:
                os.unlink(name, dir_fd=self.storage.partials_fd)
            except FileNotFoundError:
                pass
        self._temporaries.clear()
        if self._lock_fd >= 0:
            try:
                os.unlink(f"{_BATCH_PREFIX}{self._token}.lock", dir_fd=self.storage.partials_fd)
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = -1


def _write_all(fd: int, data: memoryview, position: int, what: str) -> None:
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], position + done)
    except OSError as exc:
        raise io_error(exc, what) from None


class _DirWalk:
    """A position inside a directory tree: one open directory and the names that led there.

    Only the current directory is held open, so descriptors stay bounded however deep a
    walk goes (a path may have 2,048 components; a tree on disk, any depth). Going up
    re-opens ".." and checks that it is the directory the walk came down from, so a
    directory moved away meanwhile can never lead the walk out of where it started.
    """

    def __init__(self, start_fd: int) -> None:
        """Start at (a duplicate of) start_fd; the caller keeps its own open meanwhile."""
        self._start_fd = start_fd
        self.fd = os.dup(start_fd)
        st = os.fstat(self.fd)
        self._names: list[str] = []
        self._identities = [(st.st_dev, st.st_ino)]  # of each directory on the way down

    @property
    def depth(self) -> int:
        return len(self._names)

    @property
    def name(self) -> str:
        """The current directory's name in its parent (depth > 0)."""
        return self._names[-1]

    def down(self, name: str, st: os.stat_result | None = None) -> None:
        """Enter the real directory `name` (never through a symlink: ELOOP/ENOTDIR)."""
        fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        if st is None:
            st = os.fstat(fd)
        os.close(self.fd)
        self.fd = fd
        self._names.append(name)
        self._identities.append((st.st_dev, st.st_ino))

    def up(self) -> None:
        """Back to the parent; BadPath if it is no longer the directory come down from."""
        parent = os.open("..", _DIR_FLAGS, dir_fd=self.fd)
        st = os.fstat(parent)
        if (st.st_dev, st.st_ino) != self._identities[-2]:
            os.close(parent)
            raise BadPath(f"{self._names[-1]!r} was moved while it was walked")
        os.close(self.fd)
        self.fd = parent
        self._names.pop()
        self._identities.pop()

    def restart(self) -> None:
        """Back to where the walk started (the root, for an absolute symlink target)."""
        fd = os.dup(self._start_fd)
        os.close(self.fd)
        self.fd = fd
        del self._names[:], self._identities[1:]

    def release(self) -> int:
        """The current directory's fd, now the caller's to close."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _is_utf8(name: str) -> bool:
    """False for a name on disk whose bytes are not UTF-8: Python carries them as
    surrogate escapes, which no JSON reply can hold."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _remove_tree(parent_fd: int, name: str) -> int:
    """Delete a directory tree through directory fds (no symlink is ever followed).

    Depth first with one directory open at a time (plus the caller's parent_fd), so
    neither a wide nor a deep tree can run the process out of descriptors.
    """
    count = 0
    walk = _DirWalk(parent_fd)
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


def _lock_holder(fd: int) -> int:
    """PID of the process holding a POSIX write lock on fd, or 0 if none is visible."""
    query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    l_type, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return pid if l_type != fcntl.F_UNLCK else 0


class PartialUpload:
    """An upload in progress: a locked partial file, verified before it is placed.

    The partial is keyed by path, size and the client's source tag, so a changed
    local file never resumes onto bytes of an older version.  A new connection
    for the same key takes over from a holder that is still alive (stalled, or
    abandoned by its client) by signalling it, rather than waiting for its
    idle timeout.
    """

    def __init__(self, storage: Storage, parts: tuple[str, ...], size: int, name: str) -> None:
        self.storage = storage
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
                          bytearray(storage.buffer_size))
        except OSError as exc:
            self.close()
            raise io_error(exc, "reading the partial upload") from None
        except BaseException:
            self.close()
            raise

    def _claim(self) -> int:
        pfd = self.storage.partials_fd
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
        _write_all(self.fd, data, self.written, "writing the upload")
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
        self.trashed = self.storage.place(self.name, self.parts)
        if st.st_size >= _UNCACHED_DIGEST:  # smaller files are hashed, never looked up
            self.storage.store_digest((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),
                                      actual, "/".join(self.parts))
        return actual

    def discard(self) -> None:
        try:
            os.unlink(self.name, dir_fd=self.storage.partials_fd)
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
            if mine.st_size == 0 and os.stat(self.name, dir_fd=self.storage.partials_fd,
                                             follow_symlinks=False).st_ino == mine.st_ino:
                os.unlink(self.name, dir_fd=self.storage.partials_fd)
        except OSError:
            pass

    def release_replaced(self) -> None:
        """Free the file this upload replaced (slow for big files: after the reply)."""
        if self.trashed is not None:
            self.storage.empty_trash(self.trashed)
            self.trashed = None
