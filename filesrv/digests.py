"""The digest cache: XXH3-128 of served files, kept in `<root>/.filesrv/digests/`.

An entry is named by the file's identity (`<dev>-<ino>`) and holds its size, mtime and
path, so a changed file never gets an old digest, and the sweep (`prune`) can drop the
entries of files deleted, changed or moved since.  Losing an entry only costs a re-hash.
"""

from __future__ import annotations

import json
import os
import time

import xxhash

from .errors import FilesrvError
from .hashing import hash_fd_range
from .root import ConfinedRoot, ReadableFile

UNCACHED_BELOW = 1024 * 1024  # below this, hashing is cheaper than a cache lookup
DIGEST_CACHE_MAX = 20_000  # entries kept by each sweep (each one a file of 1 MiB or more)
_UNFINISHED_MAX_AGE = 60.0  # an entry's temporary older than this was left by a crash


class DigestCache:
    """Whole-file digests of the root's files, remembered across connections."""

    def __init__(self, root: ConfinedRoot, buffer_size: int) -> None:
        self.root = root
        self.buffer_size = buffer_size
        self.fd = root.state_dir("digests")

    def digest_of(self, f: ReadableFile) -> str:
        """Whole-file XXH3-128, from the cache when this version was hashed before."""
        cacheable = f.size >= UNCACHED_BELOW  # below it, hashing beats a cache lookup
        if cacheable:
            cached = self._cached(f.identity)
            if cached is not None:
                return cached
        hasher = xxhash.xxh3_128()
        hash_fd_range(f.fd, 0, f.size, hasher, bytearray(min(self.buffer_size, f.size)))
        digest = hasher.hexdigest()
        st = os.fstat(f.fd)
        if cacheable and (st.st_size, st.st_mtime_ns) == f.identity[2:]:  # unchanged meanwhile
            self.store(f.identity, digest, f.path)
        return digest

    def _cached(self, identity: tuple[int, int, int, int]) -> str | None:
        dev, ino, size, mtime_ns = identity
        try:
            with open(f"{dev:x}-{ino:x}", "rb", opener=self._opener) as fh:
                record = json.loads(fh.read())
            if record["size"] == size and record["mtime_ns"] == mtime_ns:
                return str(record["xxh128"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def store(self, identity: tuple[int, int, int, int], digest: str,
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
                         dir_fd=self.fd)
            try:
                os.write(fd, record.encode())
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError:
            pass

    def remember(self, st: os.stat_result, digest: str, path: str) -> None:
        """Store the digest of a file just written (`st`), if it is big enough to cache."""
        if st.st_size >= UNCACHED_BELOW:  # smaller files are hashed, never looked up
            self.store((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), digest, path)

    def _opener(self, name: str, flags: int) -> int:
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=self.fd)

    def prune(self, max_entries: int = DIGEST_CACHE_MAX) -> int:
        """The sweep of the digest cache: drop the entries of files deleted, changed or
        moved since they were hashed (looked up again at the path they had), writes cut
        short, and beyond `max_entries` the oldest. How many were dropped."""
        cutoff = time.time() - _UNFINISHED_MAX_AGE
        kept: list[tuple[float, str]] = []
        dropped = 0
        with os.scandir(self.fd) as it:
            names = [e.name for e in it]
        for name in names:
            try:
                written = os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mtime
            except OSError:
                continue
            if name.endswith(".tmp"):
                current = written >= cutoff  # still being written, or left by a crash
            else:
                current = self._entry_current(name)
                if current:
                    kept.append((written, name))
            if not current:
                dropped += self._drop(name)
        kept.sort()
        for _, name in kept[: max(0, len(kept) - max_entries)]:
            dropped += self._drop(name)
        return dropped

    def _entry_current(self, name: str) -> bool:
        """The file the entry was written for is still at its path, unchanged."""
        try:
            with open(name, "rb", opener=self._opener) as fh:
                record = json.loads(fh.read(64 * 1024))
            path = record["path"]
            kind, st = self.root.stat_entry(tuple(path.split("/")))
            return (kind == "file" and name == f"{st.st_dev:x}-{st.st_ino:x}"
                    and (st.st_size, st.st_mtime_ns) == (record["size"], record["mtime_ns"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, FilesrvError):
            return False  # gone, changed, unreadable, or an entry from before paths were kept

    def _drop(self, name: str) -> int:
        try:
            os.unlink(name, dir_fd=self.fd)
            return 1
        except OSError:
            return 0
