"""Local file state of downloads: partials beside their destinations, write-through
sinks, placement (the atomic rename) and the free-space check.

A download is written into `.NAME.filesrv-part` beside its destination, locked while in
use, with a `.json` record of the remote version it comes from (the resume
precondition), and renamed over NAME only once its digest matched.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat

import xxhash

from .durability import Writeback, flush_filesystem
from .errors import Busy, LocalError, LocalNoSpace
from .fileio import pwrite_all
from .hashing import hash_fd_range
from .protocol import normalize_path

PARTIAL_SUFFIX = ".filesrv-part"
NAME_MAX = 255  # bytes in a file name (ext4, xfs, btrfs, tmpfs)
# what a partial's longest companion adds to its destination's name: "." + ".json.tmp"
_PARTIAL_EXTRA_BYTES = len(f".{PARTIAL_SUFFIX}.json.tmp")
# a shortened partial name: "." + prefix + "~" + 32 hex digits + suffix + ".json.tmp"
_PARTIAL_PREFIX_BYTES = NAME_MAX - _PARTIAL_EXTRA_BYTES - 33


def file_digest(path: str) -> str:
    """The XXH3-128 of a local file, as xxh128sum prints it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalError(f"cannot read {path}: {exc.strerror}") from None
    try:
        hasher = xxhash.xxh3_128()
        hash_fd_range(fd, 0, os.fstat(fd).st_size, hasher, bytearray(1024 * 1024))
        return hasher.hexdigest()
    finally:
        os.close(fd)



def existing_file(path: str) -> tuple[int, str] | None:
    """(size, XXH3-128) of a local regular file, or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_size, file_digest(path)



def free_bytes(folder: str) -> int | None:
    """Bytes this process may still write on the filesystem of `folder` (root may use
    the blocks reserved for it), or None when the filesystem does not say."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize



def no_local_space(partial: "LocalPartial", needed: int, free: int) -> LocalNoSpace:
    """The message for a download that does not fit: the numbers, and what is kept."""
    # the partial's size on disk, not the bytes counted: a write that ran out of space
    # midway kept what it wrote, and a re-run resumes from all of it
    held = os.fstat(partial.fd).st_size
    if held and os.path.exists(partial.meta_path):
        kept = (f"the {_bytes(held)} received are kept in {shown(partial.path)}: free some "
                "space and run the same command again to resume")
    else:
        partial.truncate(0)  # not resumable (no record of its version): not worth its space
        kept = "nothing is kept: free some space and run the same command again"
    return LocalNoSpace(f"no space left for {shown(partial.destination)}: {_bytes(needed)} "
                        f"more needed, {_bytes(free)} free in {shown(partial.folder)}; {kept}")



def _bytes(n: int) -> str:
    """'3.0 MiB (3145728 bytes)': readable, and exact."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} bytes" if unit == "B" else f"{size:.1f} {unit} ({n} bytes)"



def make_local_dir(path: str) -> None:
    """mkdir -p for a download; a file in the way or a refusal is a LocalError."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise LocalError(f"{shown(path)} exists and is not a directory") from None
    except OSError as exc:
        raise LocalError(f"cannot create directory {shown(path)}: {exc.strerror}") from None



def shown(path: str) -> str:
    """A local path for a message, undecodable bytes as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")



def partial_name(name: str) -> str:
    """The partial's file name for destination `name`: `.NAME.filesrv-part`, shortened
    when that (or its `.json.tmp` companion) would exceed NAME_MAX.

    A shortened name keeps a readable prefix of NAME and adds a digest of the whole
    NAME, so it is the same on every run (resume finds it) and differs between names.
    """
    encoded = os.fsencode(name)
    if len(encoded) + _PARTIAL_EXTRA_BYTES <= NAME_MAX:
        return f".{name}{PARTIAL_SUFFIX}"
    digest = hashlib.sha256(encoded).hexdigest()[:32]
    cut = _PARTIAL_PREFIX_BYTES
    while cut and encoded[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character
        cut -= 1
    return f".{os.fsdecode(encoded[:cut])}~{digest}{PARTIAL_SUFFIX}"



def writes_through(local: str) -> bool:
    """Whether a download to `local` is written through in order: a character device
    or FIFO is there (as cp and curl write to them). A socket or block device there is
    refused; neither is ever replaced."""
    try:
        st = os.stat(local)
    except OSError:
        return False
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return True
    if stat.S_ISSOCK(st.st_mode) or stat.S_ISBLK(st.st_mode):
        raise LocalError(f"{local} is a {_file_kind(st)}: a download goes to a file, a "
                         "character device or a FIFO")
    return False



def _file_kind(st: os.stat_result) -> str:
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket")):
        if test(st.st_mode):
            return kind
    return "special file"



def placement_target(destination: str) -> str:
    """The file a download to `destination` replaces: the path itself or, for a symlink,
    the file it points to (written through, as cp does; the link stays). Anything there
    but a regular file is refused, never replaced."""
    if os.path.islink(destination):
        target = os.path.realpath(destination)
        if not os.path.lexists(target):
            raise LocalError(f"{destination} is a dangling symlink; not writing through it")
        destination = target
    try:
        st = os.stat(destination)
    except FileNotFoundError:
        return destination
    except OSError as exc:
        raise LocalError(f"cannot write {destination}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LocalError(f"{destination} is a {_file_kind(st)}, not a regular file; it is "
                         "not replaced")
    return destination



class StreamSink:
    """A character device or FIFO that a download is written through to, in order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = 0
        self.hasher = xxhash.xxh3_128()  # of the bytes written so far
        self.etag: str | None = None  # the version they come from
        try:  # a FIFO blocks here until it has a reader, as with cp
            self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise LocalError(f"cannot write {path}: {exc.strerror}") from None

    def write(self, data: memoryview, position: int) -> None:
        try:
            done = 0
            while done < len(data):
                done += os.write(self.fd, data[done:])
        except BrokenPipeError:  # its reader went away (`get x /dev/stdout | head`): the
            raise  # CLI ends quietly by SIGPIPE as coreutils do, not with an error
        except OSError as exc:
            raise LocalError(f"cannot write {self.path}: {exc.strerror}") from None
        self.written = position + len(data)

    def close(self) -> None:
        os.close(self.fd)



class LocalPartial:
    """The client's partial download beside its destination, locked while in use.

    `.NAME.filesrv-part` holds the bytes; `.NAME.filesrv-part.json` remembers
    which remote file version (etag) they came from, the resume precondition.
    For names too long for that, see partial_name().
    """

    def __init__(self, destination: str, durable: bool = True) -> None:
        given, destination = destination, placement_target(destination)
        self.destination = destination
        self.durable = durable
        folder, name = os.path.split(os.path.abspath(destination))
        self.folder = folder
        self.path = os.path.join(folder, partial_name(name))
        self.meta_path = self.path + ".json"
        # never through a link planted at the partial's name
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            try:
                self.fd = os.open(self.path, flags | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:  # left by an interrupted get: maybe resumable
                self.fd = os.open(self.path, flags, 0o644)
                created = False
        except OSError as exc:  # named as the user gave it, not as our hidden partial
            folder_given = os.path.dirname(given) or "."
            if isinstance(exc, FileNotFoundError):
                raise LocalError(f"no such local directory {folder_given}") from None
            raise LocalError(f"cannot write into {folder_given}: {exc.strerror}") from None
        # what a partial we created ourselves cannot have: bytes, a .json beside it.
        # Knowing it spares a batch of small files a few system calls each.
        self._empty = created
        self._may_have_meta = not created
        self._placed = False
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise LocalError(f"{self.path} is not a regular file; remove it to download "
                             f"{given}")
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise Busy(f"another filesrv process is downloading to {destination}") from None
        self.writeback = Writeback(self.fd)

    def resume_point(self, remote: str) -> tuple[int, str | None]:
        """(offset, etag) to resume from, or (0, None) when nothing usable is there."""
        self._may_have_meta = True  # even beside a new partial, an orphan is cleared
        size = os.fstat(self.fd).st_size
        try:
            with open(self.meta_path, encoding="utf-8") as fh:
                meta = json.load(fh)
            if meta["remote"] == normalize_path(remote) and 0 < size <= meta["size"]:
                return size, str(meta["etag"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.truncate(0)
        return 0, None

    def remember(self, remote: str, etag: str, size: int) -> None:
        record = {"remote": normalize_path(remote), "etag": etag, "size": size}
        self._may_have_meta = True
        tmp = self.meta_path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(record, fh)
            os.replace(tmp, self.meta_path)
        except OSError as exc:
            raise LocalError(f"cannot write {self.meta_path}: {exc.strerror}") from None

    def truncate(self, length: int) -> None:
        # only when it changes something: on ext4 any truncate to 0 makes close()
        # flush the whole file (auto_da_alloc), ~0.25 s per GiB
        if not (self._empty and length == 0) and os.fstat(self.fd).st_size != length:
            os.ftruncate(self.fd, length)
        self.writeback = Writeback(self.fd, length)

    def write(self, data: memoryview, position: int) -> None:
        self._empty = False
        try:
            pwrite_all(self.fd, data, position)
        except OSError as exc:
            kind = LocalNoSpace if exc.errno in (errno.ENOSPC, errno.EDQUOT) else LocalError
            raise kind(f"cannot write {self.path}: {exc.strerror}") from None
        if self.durable:
            self.writeback.wrote_up_to(position + len(data))

    def reset(self) -> None:
        self.truncate(0)
        self._remove_meta()

    def place(self) -> None:
        """Make the bytes durable, then rename over the destination atomically.

        The folder is not fsynced: after a crash either the rename happened or the
        complete partial is still there, and the next get finishes the job.
        """
        try:
            if self.durable:
                self.writeback.finish()
            os.replace(self.path, self.destination)
        except OSError as exc:
            raise LocalError(f"cannot place {self.destination}: {exc.strerror}") from None
        self._placed = True
        self._remove_meta()

    def _remove_meta(self) -> None:
        if not self._may_have_meta:
            return
        try:
            os.unlink(self.meta_path)
        except FileNotFoundError:
            pass
        self._may_have_meta = False

    def close(self) -> None:
        """Release the lock; an empty partial is not worth keeping."""
        if self.fd < 0:
            return
        try:
            if not self._placed and os.fstat(self.fd).st_size == 0 and \
                    os.path.exists(self.path):
                os.unlink(self.path)
                self._remove_meta()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1



def place_and_close(partial: "LocalPartial") -> None:
    try:
        partial.place()
    finally:
        partial.close()



def place_together(partials: list["LocalPartial"]) -> None:
    """Flush the partials' bytes at once, rename them all, flush the renames at once."""
    try:
        if partials:
            try:
                # one fd per filesystem the tree spans (a subdirectory may be a mount)
                filesystems = {os.fstat(p.fd).st_dev: p.fd for p in partials}.values()
                for fd in filesystems:
                    flush_filesystem(fd)
                for partial in partials:
                    partial.place()
                for fd in filesystems:
                    flush_filesystem(fd)
            except OSError as exc:
                raise LocalError(f"cannot flush the downloaded files: {exc.strerror}"
                                 ) from None
    finally:
        for partial in partials:
            partial.close()

