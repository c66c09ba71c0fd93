"""Local files as the sources of uploads: which version of a file is sent, the checks
that it did not change while it was read, and the walk of a local tree to upload."""

from __future__ import annotations

import os
import stat
import time
from typing import NamedTuple, NoReturn

import xxhash

from .errors import FilesrvError, LocalError, SourceChanged
from .fileio import is_utf8
from .hashing import hash_fd_range
from .local import shown


def source_tag(st: os.stat_result) -> str:
    """Names this version of a local file, so a changed file never resumes an old partial."""
    return f"{st.st_dev:x}-{st.st_ino:x}-{st.st_mtime_ns:x}"



# A file changed this recently may have a write in flight: a write sets mtime and ctime
# when it begins, so one that began before our first fstat and ends during our read
# shows nothing new in the second. Such a file is read (hashed) twice and compared.
SETTLE_NS = 1_000_000_000



def file_version(st: os.stat_result) -> tuple[int, ...]:
    """What differs once a file's content may have changed: identity, size, times."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)



def is_settled(st: os.stat_result) -> bool:
    """Whether the file's last change is older than SETTLE_NS (a clock skewed into the
    future counts as recent)."""
    return time.time_ns() - st.st_ctime_ns >= SETTLE_NS



class LocalSource(NamedTuple):
    """One version of a local file being uploaded: its descriptor and fstat then."""

    fd: int
    st: os.stat_result
    settled: bool  # no write to it can plausibly still be in flight

    @classmethod
    def now(cls, fd: int) -> "LocalSource":
        st = os.fstat(fd)
        return cls(fd, st, is_settled(st))

    def check_unchanged(self, digest: str, buffer: bytearray) -> None:
        """SourceChanged unless the file is still the version read as `digest`."""
        if file_version(os.fstat(self.fd)) != file_version(self.st):
            raise SourceChanged("the local file changed while it was read")
        if self.settled:
            return
        hasher = xxhash.xxh3_128()  # recently changed: what is there now must match
        try:
            hash_fd_range(self.fd, 0, self.st.st_size, hasher, buffer)
        except FilesrvError:
            raise SourceChanged("the local file shrank") from None
        if hasher.hexdigest() != digest or \
                file_version(os.fstat(self.fd)) != file_version(self.st):
            raise SourceChanged("the local file changed while it was read")



class TreePlan(NamedTuple):
    """A local tree to upload: relative directories, (relative file, size), skipped links,
    and names skipped because they are not valid UTF-8 (shown with \\x escapes)."""

    dirs: list[str]
    files: list[tuple[str, int]]
    skipped_links: list[str]
    skipped_names: tuple[str, ...] = ()



def plan_local_tree(local_dir: str) -> TreePlan:
    """Walk a local tree without following symlinks; paths relative, '/'-separated.

    Names the protocol cannot carry (not UTF-8) are skipped, and a directory so named
    with all it holds; a directory that cannot be read is an error, never a silent gap.
    """
    if not os.path.isdir(local_dir):
        raise LocalError(f"{local_dir} is not a directory" if os.path.lexists(local_dir)
                         else f"no such local directory {local_dir}")
    dirs, files, links, unnamed = [], [], [], []
    for top, subdirs, names in os.walk(local_dir, followlinks=False, onerror=_unreadable):
        rel_top = os.path.relpath(top, local_dir)
        prefix = "" if rel_top == "." else rel_top.replace(os.sep, "/") + "/"
        for d in sorted(subdirs):
            if not is_utf8(d):
                unnamed.append(shown(prefix + d))
                subdirs.remove(d)  # os.walk then leaves it out
            elif os.path.islink(os.path.join(top, d)):
                links.append(prefix + d)
            else:
                dirs.append(prefix + d)
        for name in sorted(names):
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # gone since the directory was read
                continue
            except OSError as exc:
                raise LocalError(f"cannot read {shown(path)}: {exc.strerror}") from None
            if not is_utf8(name) and (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                unnamed.append(shown(prefix + name))
            elif stat.S_ISREG(st.st_mode):
                files.append((prefix + name, st.st_size))
            elif stat.S_ISLNK(st.st_mode):
                links.append(prefix + name)
    return TreePlan(dirs, files, links, tuple(unnamed))



def _unreadable(exc: OSError) -> NoReturn:
    raise LocalError(f"cannot read {shown(exc.filename or '')}: {exc.strerror}")

