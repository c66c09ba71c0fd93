"""The remote commands that are one request and its reply (ls, stat, hash, rm, mv,
mkdir), and the pipelined hash of a tree, over a Connection."""

from __future__ import annotations

from typing import Any, Generator, Iterator

from .connection import Connection
from .errors import FilesrvError, IsADirectory, NotFound
from .protocol import (Entry, Listing, ListDir, MakeDir, Move, Remove, Stat, StatReply,
                       check_reply, parse_entry, parse_path, parse_removed_reply, parse_stat_reply)

AHEAD_BYTES = 32 * 1024   # requests sent before their replies are read (PROTOCOL.md 2.5)


def join_path(base: str, rel: str) -> str:
    """A remote path: `rel` under `base` ('' is the root)."""
    return f"{base}/{rel}" if base else rel


class LiveListing(Iterator[Entry]):
    """The entries of a listing as they arrive (a generator's next and close);
    `names_left_out` is known once the last entry is out."""

    names_left_out: int = 0
    entries: Generator[Entry, None, None]

    def __next__(self) -> Entry:
        return next(self.entries)

    def close(self) -> None:
        """Stop early: the rest of the listing is never read."""
        self.entries.close()


class RemoteCommands(Connection):
    """The commands on remote names, retried after a cut where that is safe."""

    def ls(self, path: str = "", recursive: bool = False) -> Listing:
        """One directory's entries; recursive: the whole tree, names relative to `path`.
        Its `names_left_out`: how many names the server could not list (not UTF-8)."""
        parse_path(path, allow_root=True)

        def once() -> Listing:
            listing = Listing()
            listing.extend(self._listing(path, recursive, listing))
            return listing
        return self._retrying(once)

    def iter_ls(self, path: str = "", recursive: bool = False) -> "LiveListing":
        """ls, entry by entry as the listing arrives (in chunks): a huge tree is never
        held whole, here or on the server. Stopping early closes the connection (the
        rest of the listing is unread); the next command opens a new one. A connection
        cut before the first chunk is retried as ls does; after it, entries were handed
        out already and the failure is raised. Once it is exhausted, its
        `names_left_out` says how many names the server could not list."""
        parse_path(path, allow_root=True)
        live = LiveListing()
        live.entries = self._listing(path, recursive, live, retry_first=True)
        return live

    def _listing(self, path: str, recursive: bool, listing: Any,
                 retry_first: bool = False) -> Iterator[Entry]:
        def first_chunk() -> tuple[Iterator[tuple[list[Any], bool]], list[Any], bool]:
            self._request(ListDir(path=path, recursive=recursive, chunked=True).frame())
            chunks = self._chunks(self._reply(check_reply), listing)  # refused: in step
            return (chunks, *next(chunks))

        chunks, items, in_step = self._retrying(first_chunk) if retry_first else first_chunk()
        try:  # in_step: the last chunk is read, nothing of the reply is left unread
            while True:
                yield from map(parse_entry, items)
                if in_step:
                    return
                items, in_step = next(chunks)
        finally:
            if not in_step:
                self.close()

    def stat(self, path: str) -> StatReply:
        """type ("file"/"dir"), size, mtime and, for files, the XXH3-128 digest."""
        parse_path(path, allow_root=True)
        return self._retrying(lambda: self._stat_once(path))

    def _stat_once(self, path: str) -> StatReply:
        self._request(Stat(path=path).frame())
        return self._reply(parse_stat_reply)

    def _remote_file(self, path: str) -> StatReply | None:
        try:
            return self.stat(path)
        except NotFound:
            return None

    def hash(self, path: str) -> str:
        """The server's XXH3-128 digest of a file, as xxh128sum prints it."""
        info = self.stat(path)
        if info.xxh128 is None:
            raise IsADirectory(f"{path!r} is a directory")
        return info.xxh128

    def hash_tree(self, remote_dir: str, listing: list[Entry] | None = None
                  ) -> Iterator[tuple[str, int, str]]:
        """(name relative to remote_dir, size, XXH3-128) of every file in a tree.

        The stat requests go out many at a time (up to AHEAD_BYTES), not a round
        trip each. `listing`: the tree's `ls(remote_dir, recursive=True)` if the caller
        has it.
        """
        base = remote_dir.rstrip("/")
        if listing is None:
            listing = self.ls(base, recursive=True)
        files = [e for e in listing if e.type == "file"]
        start = 0
        while start < len(files):
            names, frames, size = [], [], 0
            while start + len(names) < len(files) and size < AHEAD_BYTES:
                names.append(files[start + len(names)].name)
                frames.append(Stat(path=join_path(base, names[-1])).frame())
                size += len(frames[-1])
            # a run is read whole before it is yielded, so a cut connection retries it
            request = b"".join(frames)
            yield from self._retrying(lambda: self._hash_run(names, request))
            start += len(names)

    def _hash_run(self, names: list[str], request: bytes) -> list[tuple[str, int, str]]:
        """One pipelined run of stat requests: (name, size, XXH3-128) of each."""
        self._request(request)
        out = []
        for name in names:
            try:
                info = self._reply(parse_stat_reply)
                if info.xxh128 is None:
                    raise IsADirectory(f"{name!r} became a directory")
            except FilesrvError:
                self.close()  # the other replies of this run are unread
                raise
            out.append((name, info.size, info.xxh128))
        return out

    def rm(self, path: str, recursive: bool = False) -> int:
        """Delete a file (or with recursive, a directory tree); how many entries went."""
        parse_path(path, allow_root=True)
        self._request(Remove(path=path, recursive=recursive).frame())
        return self._reply(parse_removed_reply)

    def mv(self, src: str, dst: str) -> None:
        """Rename within the server's root, atomically."""
        parse_path(src, allow_root=True)
        parse_path(dst, allow_root=True)
        self._request(Move(src=src, dst=dst).frame())
        self._reply(check_reply)

    def mkdir(self, path: str, parents: bool = False) -> None:
        parse_path(path, allow_root=True)
        self._request(MakeDir(path=path, parents=parents).frame())
        self._reply(check_reply)
