"""Listings: one directory, or a whole tree, walked on held directory descriptors and
yielded sorted by name as the walk goes."""

from __future__ import annotations

import errno
import os
import stat
from typing import Callable, Iterator

from .errors import FilesrvError
from .fileio import is_utf8
from .protocol import RESERVED_NAME, Entry
from .root import ConfinedRoot, DirWalk, io_error


def iter_dir(root: ConfinedRoot, parts: tuple[str, ...], recursive: bool = False,
             on_skip: Callable[[str], None] | None = None) -> Iterator[Entry]:
    """Entries of one directory, or (recursive) of its whole tree with relative names,
    sorted by name and yielded as the walk goes: what is held is the entries not yet
    yielded of the directories on the current path, never the whole tree.

    A recursive walk does not descend into symlinked directories (no cycles). Each
    subdirectory is opened from its parent's fd (O_NOFOLLOW), not resolved again from
    the root, and only one directory is held open however deep the tree. A name that
    is not valid UTF-8 cannot be sent: it is left out (a directory with all it holds)
    and `on_skip` is told, with the name escaped.
    """
    top_fd = root.open_dir(parts)
    try:
        walk = DirWalk(top_fd)
    finally:
        os.close(top_fd)
    try:
        # depth first; for each directory on the way down, what is left of it
        pending = [_sorted_level(root, parts, walk.fd, "", on_skip, recursive)]
        where = list(parts)
        while pending:
            if not pending[-1]:
                pending.pop()
                if walk.depth:
                    walk.up()
                    where.pop()
                continue
            key, entry = pending[-1].pop()
            if entry is not None:
                yield entry
                continue
            name = key[:-1]  # "name/": the subtree of name comes here in the order
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
            pending.append(_sorted_level(root, tuple(where), walk.fd, prefix, on_skip,
                                         True))
    except OSError as exc:  # e.g. a directory the daemon may not read: say so
        raise io_error(exc, "listing a directory") from None
    finally:
        walk.close()



def _sorted_level(root: ConfinedRoot, parts: tuple[str, ...], dir_fd: int, prefix: str,
                  on_skip: Callable[[str], None] | None, descend: bool
                  ) -> list[tuple[str, Entry | None]]:
    """One directory's entries by name, and (descend) for each real subdirectory the
    key "name/" of its subtree, sorted last first (they are taken with pop()).

    All names under "d/" sort together, right where "d/" sorts among the names of
    d's siblings ("d" < "d-x" < "d.x" < "d/..." < "d0"): so walking each subtree when
    its key comes up yields the whole tree sorted by relative name.
    """
    entries: list[Entry] = []
    subdirs = _list_one(root, parts, dir_fd, prefix, entries, on_skip)
    keyed: list[tuple[str, Entry | None]] = [(e.name[len(prefix):], e) for e in entries]
    if descend:
        keyed += [(name + "/", None) for name in subdirs]
    keyed.sort(key=lambda item: item[0], reverse=True)
    return keyed

def _list_one(root: ConfinedRoot, parts: tuple[str, ...], dir_fd: int, prefix: str,
              entries: list[Entry], on_skip: Callable[[str], None] | None) -> list[str]:
    """Append one directory's entries (names after `prefix`); its real subdirectories."""
    subdirs = []
    with os.scandir(dir_fd) as it:
        for item in it:
            if item.name == RESERVED_NAME and _is_state_dir(root, item):
                continue  # also when the root is listed through a symlink to it
            if not is_utf8(item.name):
                if on_skip is not None:
                    on_skip(prefix + item.name.encode("utf-8", "surrogateescape")
                            .decode("ascii", "backslashreplace"))
                continue
            entry = _entry(root, parts, item, prefix + item.name)
            if entry is None:
                continue
            entries.append(entry)
            if entry.type == "dir" and item.is_dir(follow_symlinks=False):
                subdirs.append(item.name)
    subdirs.reverse()  # visited by pop(): in the order they were read
    return subdirs

def _is_state_dir(root: ConfinedRoot, item: os.DirEntry) -> bool:
    try:
        st = item.stat(follow_symlinks=False)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == root.state_identity

def _entry(root: ConfinedRoot, parts: tuple[str, ...], item: os.DirEntry, name: str) -> Entry | None:
    try:
        st = item.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            st = root.stat_entry(parts + (item.name,))[1]
    except (OSError, FilesrvError):
        return None  # dangling, or leading outside the root: not ours to show
    if stat.S_ISDIR(st.st_mode):
        return Entry(name, "dir", 0, st.st_mtime)
    if stat.S_ISREG(st.st_mode):
        return Entry(name, "file", st.st_size, st.st_mtime)
    return None
