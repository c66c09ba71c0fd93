"""Listings stream: a tree of any size is listed with bounded memory on both sides.

The 1,000,000-entry measurement of the serving child's peak memory is bench/ls_memory.py;
here a modest tree shows the mechanism: chunks of bounded size, a walk that is lazy,
and a client that yields (and a CLI that prints) each entry as its chunk arrives.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import CLI, ENV, RawConnection, cli
from filesrv.client import Client
from filesrv.protocol import (CHUNK_BYTES, FrameBuffer, ListDir, encode_chunks, encode_frame,
                              encode_listing, greeting, Entry)
from filesrv.storage import Storage

TRICKY_NAMES = ["a", "a-b", "a.c", "a0", "B", "é", "z", "\u4e2d", "a b", "~"]


def make_tree(root: Path, dirs: int, files: int, name: str = "an-entry-with-a-long-name") -> int:
    """dirs directories of `files` empty files each; the number of entries made."""
    for d in range(dirs):
        directory = root / f"d{d:03d}"
        directory.mkdir(parents=True)
        for f in range(files):
            (directory / f"{name}-{f:04d}").touch()
    return dirs * (files + 1)


def chunks_of(conn: RawConnection) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Every (chunk header, items) of a chunked reply."""
    chunks = []
    while True:
        header = conn.read_header()
        assert header["ok"] is True, header
        items = json.loads(conn.read_body(header["length"]))
        assert len(items) == header["count"]
        chunks.append((header, items))
        if not header["more"]:
            return chunks


def test_a_chunked_listing_arrives_in_bounded_chunks_in_the_same_order(daemon):
    made = make_tree(daemon.root / "t", 6, 500)  # ~180 KB of listing
    conn = RawConnection(daemon.port)
    try:
        conn.send(ListDir("t", recursive=True, chunked=True).frame())
        chunks = chunks_of(conn)
        widest = max(len(json.dumps(i, separators=(",", ":")).encode())
                     for _, items in chunks for i in items)
        assert len(chunks) >= 3
        assert all(h["length"] <= CHUNK_BYTES + widest + 2 for h, _ in chunks)
        assert [h["more"] for h, _ in chunks] == [True] * (len(chunks) - 1) + [False]
        streamed = [i for _, items in chunks for i in items]
        assert len(streamed) == made
        # the same entries, in the same order, as a client of protocol 1.0 gets them
        whole = conn.request({"op": "ls", "path": "t", "recursive": True})
        assert "more" not in whole and whole["count"] == made
        assert json.loads(conn.read_body(whole["length"])) == streamed
    finally:
        conn.close()


def test_a_recursive_listing_is_sorted_by_code_point_of_the_relative_path(daemon):
    for top in TRICKY_NAMES:
        for below in TRICKY_NAMES[:4]:
            (daemon.root / "t" / top).mkdir(parents=True, exist_ok=True)
            (daemon.root / "t" / top / below).touch()
    with Client("127.0.0.1", daemon.port) as client:
        names = [e.name for e in client.ls("t", recursive=True)]
    assert len(names) == len(TRICKY_NAMES) * 5
    assert names == sorted(names)  # Python compares str by code point
    assert names == sorted(names, key=lambda n: n.encode())  # = by UTF-8 bytes
    assert names.index("a-b") < names.index("a/a") < names.index("a0")  # not depth first


def test_the_walk_is_lazy_a_later_directory_is_read_when_its_turn_comes(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    for d in ("a", "m", "z"):
        (tmp_path / "root" / d).mkdir()
        (tmp_path / "root" / d / "f").touch()
    entries = storage.iter_dir((), recursive=True)
    assert next(entries).name == "a"
    (tmp_path / "root" / "z" / "late").touch()  # after the walk began, before it got there
    assert [e.name for e in entries] == ["a/f", "m", "m/f", "z", "z/f", "z/late"]


@pytest.mark.parametrize("seed", range(3))
def test_the_streamed_order_is_the_sorted_order_of_the_whole_tree(tmp_path, seed):
    import random
    rng = random.Random(seed)
    root = tmp_path / "root"
    paths = set()
    for _ in range(120):
        parts = [rng.choice(TRICKY_NAMES) for _ in range(rng.randint(1, 4))]
        paths.add("/".join(parts))
    for path in sorted(paths):
        target = root / path
        if not target.parent.is_dir() or target.exists():
            continue
        if rng.random() < 0.5:
            target.mkdir()
        else:
            target.touch()
    storage = Storage(str(root))
    streamed = [e.name for e in storage.iter_dir((), recursive=True)]
    on_disk = [str(p.relative_to(root)) for p in root.rglob("*") if ".filesrv" not in p.parts]
    assert streamed == sorted(on_disk)


def test_a_client_that_stops_reading_a_listing_keeps_working(daemon):
    make_tree(daemon.root / "t", 6, 500)
    (daemon.root / "file.txt").write_bytes(b"abc")
    with Client("127.0.0.1", daemon.port) as client:
        listing = client.iter_ls("t", recursive=True)
        assert next(listing).name == "d000"
        listing.close()  # the rest of the listing is never read
        assert client.stat("file.txt").size == 3  # not a chunk taken for the reply
        assert len(client.ls("t", recursive=True)) == 6 * 501


class FakeServer:
    """Answers one ls with chunks it sends one at a time, when the test lets it."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.proceed = threading.Event()
        self.waited_out = False  # True: the client never showed the first chunk's entries
        self.request: dict[str, Any] = {}
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        try:
            conn.sendall(encode_frame(greeting("fake", None)))
            frames, headers = FrameBuffer(), []
            while len(headers) < 2:  # hello, then the ls
                data = conn.recv(65536)
                if not data:
                    return
                frames.feed(data)
                while (header := frames.next_header()) is not None:
                    headers.append(header)
            self.request = headers[1]
            conn.sendall(encode_frame(greeting("fake", None)) + self.frames[0])
            self.waited_out = not self.proceed.wait(timeout=10)
            for frame in self.frames[1:]:
                conn.sendall(frame)
            conn.recv(1)  # until the client closes
        finally:
            conn.close()

    def close(self) -> None:
        self.proceed.set()
        self.thread.join(timeout=20)
        self.listener.close()


def entries(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [Entry(f"entry-{i:05d}", "file", i, 1.0).as_dict() for i in range(start, start + count)]


def two_chunks(first: int, second: int) -> list[bytes]:
    frames = list(encode_chunks(entries(first + second)))
    assert len(frames) >= 2
    return frames


def test_the_client_yields_entries_before_the_listing_has_arrived():
    server = FakeServer(two_chunks(1500, 10))
    got: list[str] = []
    try:
        with Client("127.0.0.1", server.port, timeout=15, retries=0) as client:
            for entry in client.iter_ls("", recursive=True):
                server.proceed.set()  # the rest of the listing is sent only now
                got.append(entry.name)
    finally:
        server.close()
    assert server.request.get("chunked") is True
    assert not server.waited_out and got == [e["name"] for e in entries(1510)]


def test_the_cli_prints_entries_as_they_arrive(tmp_path):
    import subprocess
    server = FakeServer(two_chunks(1500, 10))
    proc = subprocess.Popen([*CLI, "ls", "-r", "-s", f"127.0.0.1:{server.port}", "t"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = proc.stdout.readline()  # type: ignore[union-attr]
        server.proceed.set()  # the rest of the listing is sent only now
        rest = proc.stdout.read()  # type: ignore[union-attr]
        errors = proc.stderr.read()  # type: ignore[union-attr]
        proc.wait(timeout=30)
    finally:
        server.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert not server.waited_out and first_line == "entry-00000\n", errors
    assert len(rest.splitlines()) == 1509 and proc.returncode == 0


def test_the_cli_json_listing_is_the_array_it_always_was(daemon):
    make_tree(daemon.root / "t", 2, 3)
    out = cli("ls", "-s", daemon.address, "-r", "--json", "t").stdout
    with Client("127.0.0.1", daemon.port) as client:
        expected = json.dumps([e.as_dict() for e in client.ls("t", recursive=True)],
                              ensure_ascii=False)
    assert out == expected + "\n"
    assert cli("ls", "-s", daemon.address, "--json", "t/d000/").stdout.count('"name":') == 3


def test_a_client_reads_the_single_body_of_a_server_that_does_not_chunk():
    """A protocol 1.0 server ignores `chunked` and sends one body: still a listing."""
    listed = [Entry(n, "file", 1, 2.0) for n in ("a", "b")]
    body = encode_listing(listed)
    frame = encode_frame({"ok": True, "length": len(body), "count": 2}) + body
    server = FakeServer([frame])
    server.proceed.set()
    try:
        with Client("127.0.0.1", server.port, timeout=15, retries=0) as client:
            assert client.ls("") == listed
    finally:
        server.close()


def linked_tree(root: Path, dirs: int, per_dir: int = 1000) -> int:
    """dirs directories of per_dir hard links to one file each (cheap: no inodes)."""
    import os
    for d in range(dirs):
        directory = root / f"d{d:03d}"
        directory.mkdir(parents=True)
        seed = directory / "f0000"
        seed.write_bytes(b"x")
        for i in range(1, per_dir):
            os.link(seed, directory / f"f{i:04d}")
    return dirs * (per_dir + 1)


def daemon_children(daemon) -> set[int]:
    return {int(c) for t in Path(f"/proc/{daemon.proc.pid}/task").iterdir()
            for c in (t / "children").read_text().split()}


def serving_child_peak_mib(daemon, listing: Callable[[RawConnection], None]) -> float:
    """Peak RSS (VmHWM) of the child that served `listing` on a connection of its own."""
    before = daemon_children(daemon)  # an earlier connection's child may not be gone yet
    conn = RawConnection(daemon.port)
    try:
        listing(conn)
        (child,) = daemon_children(daemon) - before
        status = Path(f"/proc/{child}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    finally:
        conn.close()


def test_a_large_listing_never_sits_in_the_serving_childs_memory(daemon):
    """40,040 entries (~3 MiB of JSON, ~20 MiB as Python objects): neither a chunked nor
    a one-body listing makes the child grow by more than a few MiB."""
    made = linked_tree(daemon.root / "t", 40)

    def tiny(conn: RawConnection) -> None:
        assert conn.request({"op": "ls", "path": ""})["count"] == 1

    def one_body(conn: RawConnection) -> None:
        reply = conn.request({"op": "ls", "path": "t", "recursive": True})
        assert reply["count"] == made
        assert len(json.loads(conn.read_body(reply["length"]))) == made

    def chunked(conn: RawConnection) -> None:
        conn.send(ListDir("t", recursive=True, chunked=True).frame())
        assert sum(len(items) for _, items in chunks_of(conn)) == made

    baseline = serving_child_peak_mib(daemon, tiny)
    for listing in (one_body, chunked):
        grew = serving_child_peak_mib(daemon, listing) - baseline
        assert grew < 8, f"{listing.__name__}: the child grew by {grew:.1f} MiB"


@pytest.mark.parametrize("tmpfile", [True, False])
def test_a_spooled_reply_is_on_disk_under_no_name(tmp_path, monkeypatch, tmpfile):
    import errno
    import os
    storage = Storage(str(tmp_path / "root"))
    if not tmpfile:  # a file system without O_TMPFILE: a file unlinked at once
        real_open = os.open

        def no_tmpfile(path, flags, *args, **kwargs):
            if flags & os.O_TMPFILE == os.O_TMPFILE:
                raise OSError(errno.EOPNOTSUPP, "not supported")
            return real_open(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", no_tmpfile)
    fd, length = storage.spool(iter([b"[", b"1,", b"2]"]))
    try:
        assert (length, os.pread(fd, 100, 0)) == (5, b"[1,2]")
        assert list((tmp_path / "root" / ".filesrv" / "partials").iterdir()) == []
    finally:
        os.close(fd)
