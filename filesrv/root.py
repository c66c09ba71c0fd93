"""The confined root: every path a client names is resolved here, and nowhere else.

Resolution goes one component at a time, relative to directory handles already held
(`dir_fd` + `O_NOFOLLOW`), so neither `..` nor a symlink (even one swapped in
mid-transfer) can lead a read or a write out of the root.  Symlinks inside the root
are followed as long as they stay in it.  Server state lives in `<root>/.filesrv/`,
which no path can name (by name at the top, by identity anywhere).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import NamedTuple

from .errors import (BadPath, FilesrvError, IoError, IsADirectory, NoSpace, NotADirectory,
                     NotFound)
from .protocol import RESERVED_NAME

_MAX_SYMLINK_HOPS = 40
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def io_error(exc: OSError, what: str) -> FilesrvError:
    """Map an OSError raised while touching storage to the protocol's error."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"no space left on the server while {what}")
    return IoError(f"I/O error while {what}: {exc.strerror}")


class SymlinkAtName(Exception):
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


class ConfinedRoot:
    """The served directory: resolves paths inside it and opens what they name."""

    def __init__(self, root: str) -> None:
        os.makedirs(root, exist_ok=True)
        self.path = os.path.realpath(root)
        self.fd = os.open(self.path, DIR_FLAGS)
        self.state_fd = ensure_dir(self.fd, RESERVED_NAME)
        state = os.fstat(self.state_fd)
        self.state_identity = (state.st_dev, state.st_ino)  # hidden by identity, not name

    def state_dir(self, name: str) -> int:
        """An fd of the server's own directory `name` in `.filesrv/`, created if missing."""
        return ensure_dir(self.state_fd, name)

    def resolve(self, parts: tuple[str, ...], *, follow_last: bool = True,
                create_parents: bool = False) -> tuple[int, str | None]:
        """Walk `parts` from the root: (fd of the parent directory, final name).

        The final name is None only for the root itself (also when a symlink such as
        `here -> .` leads back to it); a path that ends in a directory reached through
        a symlink (`d/`, `.`) is named in its parent like any other.  Symlinks are
        spliced in and must stay inside the root.  A missing parent directory is
        NotFound (with `create_parents`, it is made).  Only one directory is held open
        at a time.  The caller closes the returned fd.
        """
        walk = DirWalk(self.fd)
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
                        make_dir_if_missing(walk.fd, name)
                        walk.down(name)
                        continue
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

    def resolve_entry(self, parts: tuple[str, ...], **options: bool) -> tuple[int, str]:
        """resolve for a path that must name an entry of a directory: IsADirectory when
        it leads back to the root itself (a symlink to `.`)."""
        parent_fd, name = self.resolve(parts, **options)
        if name is None:
            os.close(parent_fd)
            raise IsADirectory(f"{'/'.join(parts)!r} is the root directory")
        return parent_fd, name

    def _inside_root(self, target: str) -> str:
        rel = os.path.relpath(os.path.normpath(target), self.path)
        if rel == "." :
            return ""
        if rel == ".." or rel.startswith("../"):
            raise BadPath("a symlink in the path leads outside the root")
        return rel

    def open_dir(self, parts: tuple[str, ...]) -> int:
        """An fd of the directory `parts` names (the caller closes it)."""
        parent_fd, name = self.resolve(parts)
        if name is None:
            return parent_fd
        try:
            return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            raise NotFound(f"no such directory: {'/'.join(parts)!r}") from None
        except NotADirectoryError:
            raise NotADirectory(f"not a directory: {'/'.join(parts)!r}") from None
        finally:
            os.close(parent_fd)

    def open_file(self, parts: tuple[str, ...]) -> ReadableFile:
        """The regular file `parts` names, opened for reading (symlinks followed inside)."""
        if not parts:
            raise IsADirectory("the root is a directory")
        parent_fd, name = self.resolve_entry(parts)
        try:
            return self.open_file_in(parent_fd, name, "/".join(parts))
        except SymlinkAtName:  # resolve followed the link: a new one appeared since
            raise BadPath(f"{'/'.join(parts)!r} changed while the path was resolved"
                          ) from None
        finally:
            os.close(parent_fd)

    @staticmethod
    def open_file_in(parent_fd: int, name: str, shown: str) -> ReadableFile:
        """The regular file `name` in parent_fd, never through a symlink."""
        try:
            # O_NONBLOCK: opening a FIFO someone placed in the root must not hang us
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=parent_fd)
        except FileNotFoundError:
            raise NotFound(f"no such file: {shown!r}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SymlinkAtName(shown) from None
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

    def stat_entry(self, parts: tuple[str, ...], follow: bool = True
                   ) -> tuple[str, os.stat_result]:
        """("file" | "dir" | "link" | "other", stat) of a path inside the root."""
        parent_fd, name = self.resolve(parts, follow_last=follow)
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


def ensure_dir(parent_fd: int, name: str) -> int:
    """An fd of the directory `name` in parent_fd, created if missing."""
    make_dir_if_missing(parent_fd, name)
    return os.open(name, DIR_FLAGS, dir_fd=parent_fd)


def make_dir_if_missing(parent_fd: int, name: str) -> None:
    try:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    except FileExistsError:
        pass


class DirWalk:
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
        fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        if st is None:
            st = os.fstat(fd)
        os.close(self.fd)
        self.fd = fd
        self._names.append(name)
        self._identities.append((st.st_dev, st.st_ino))

    def up(self) -> None:
        """Back to the parent; BadPath if it is no longer the directory come down from."""
        parent = os.open("..", DIR_FLAGS, dir_fd=self.fd)
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

