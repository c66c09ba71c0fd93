"""Regression guards for the fast paths, by structure rather than by time.

Speed itself is measured by bench/run.py, never asserted here.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter
from pathlib import Path

from conftest import random_file, xxh128_of
from filesrv.client import Client
from filesrv.handlers import Handlers
from filesrv.protocol import Get, decode_header, parse_length_prefix
from filesrv.server import ServerOptions
from filesrv.storage import Storage
from filesrv.transport import Channel


class CountingSocket(socket.socket):
    """A real socket that also counts how its bytes were sent."""

    calls: Counter

    def sendfile(self, *args, **kwargs):  # type: ignore[override]
        self.calls["sendfile"] += 1
        return super().sendfile(*args, **kwargs)

    def sendall(self, *args, **kwargs):  # type: ignore[override]
        self.calls["sendall"] += 1
        return super().sendall(*args, **kwargs)

    def send(self, *args, **kwargs):  # type: ignore[override]
        self.calls["send"] += 1
        return super().send(*args, **kwargs)


def test_downloads_are_sent_with_sendfile(tmp_path: Path):
    root = tmp_path / "root"
    data = random_file(root / "f.bin", 8 * 1024 * 1024 + 3).read_bytes()
    ours, theirs = socket.socketpair()
    sock = CountingSocket(fileno=ours.detach())
    sock.calls = Counter()
    received = bytearray()

    def reader() -> None:
        while chunk := theirs.recv(1 << 20):
            received.extend(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    server = type("S", (), {"storage": Storage(str(root))})()
    handler = Handlers(server, sock, ServerOptions(), "peer")  # one command, no connection
    handler.channel = Channel(sock)
    handler._get(Get(path="f.bin"))
    sock.close()
    thread.join(timeout=30)
    theirs.close()
    length = parse_length_prefix(bytes(received[:4]))
    header = decode_header(bytes(received[4:4 + length]))
    assert header["length"] == len(data) and bytes(received[4 + length:]) == data
    assert sock.calls["sendfile"] == 1 and sock.calls["sendall"] == 1  # header, then body
    assert sock.calls["send"] == 0


def test_receive_loop_reuses_one_buffer(daemon, tmp_path: Path):
    size = 32 * 1024 * 1024
    src = random_file(daemon.root / "big.bin", size)
    calls: Counter = Counter()

    def profile(frame, event, arg) -> None:
        if event == "c_call":
            calls[getattr(arg, "__qualname__", str(arg))] += 1

    with Client("127.0.0.1", daemon.port, buffer_size=256 * 1024) as client:
        client.ls("")  # handshake outside the measured window
        import sys
        sys.setprofile(profile)
        try:
            client.get("big.bin", str(tmp_path / "big.bin"))
        finally:
            sys.setprofile(None)
    assert xxh128_of(tmp_path / "big.bin") == xxh128_of(src)
    assert calls["socket.recv_into"] >= size // (256 * 1024)
    # recv() allocates a new bytes object per call; body bytes must land in the
    # reused buffer through recv_into, so recv only ever reads headers
    assert calls["socket.recv"] <= 2, calls


def test_get_with_fsync_flushes_through_the_writeback_window(daemon, tmp_path: Path,
                                                            monkeypatch):
    from filesrv import durability
    size = 40 * 1024 * 1024 + 5  # one whole 32 MiB window, then the rest
    src = random_file(daemon.root / "w.bin", size)
    events: list[tuple] = []
    real_range = durability._libc("sync_file_range")
    assert real_range is not None, "Linux has sync_file_range"
    real_fsync, real_replace = os.fsync, os.replace

    def sync_file_range(fd, offset, length, flags):  # the real call, observed
        events.append(("sync_file_range", offset, length))
        return real_range(fd, offset, length, flags)

    def fsync(fd):
        events.append(("fsync",))
        return real_fsync(fd)

    def replace(src_path, dst_path):
        events.append(("replace", os.path.basename(dst_path)))
        return real_replace(src_path, dst_path)

    monkeypatch.setitem(durability._libc_functions, "sync_file_range", sync_file_range)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with Client("127.0.0.1", daemon.port, durable=True) as client:  # what --fsync sets
        got = client.get("w.bin", str(tmp_path / "w.bin"),
                         progress=lambda done, total: events.append(("progress", done)))
    assert got.xxh128 == xxh128_of(src) == xxh128_of(tmp_path / "w.bin")
    kinds = [e[0] for e in events]
    # the first window's writeback starts while the download goes on, not at the end
    window = kinds.index("sync_file_range")
    assert events[window][1:] == (0, durability.WINDOW)
    assert ("progress", size) in events[window:]
    # and the file is flushed after its last byte, before it takes its name
    last_byte = events.index(("progress", size))
    placed = events.index(("replace", "w.bin"))
    assert "fsync" in kinds[last_byte:placed], events[last_byte:]


def test_put_sends_file_bytes_zero_copy_and_hashes_them(daemon, tmp_path: Path):
    src = random_file(tmp_path / "p.bin", 5 * 1024 * 1024 + 1)
    calls: Counter = Counter()

    def profile(frame, event, arg) -> None:
        if event == "c_call":
            calls[getattr(arg, "__qualname__", str(arg))] += 1

    import sys
    with Client("127.0.0.1", daemon.port, buffer_size=1024 * 1024) as client:
        client.ls("")
        sys.setprofile(profile)
        try:
            result = client.put(str(src), "p.bin")
        finally:
            sys.setprofile(None)
    assert result.xxh128 == xxh128_of(src) == xxh128_of(daemon.root / "p.bin")
    assert calls["sendfile"] >= 6, calls  # os.sendfile: at least once per 1 MiB chunk
    assert calls["socket.sendall"] == 3, calls  # the put, data and commit frames only
    assert os.path.getsize(daemon.root / "p.bin") == src.stat().st_size


def test_first_request_travels_with_the_hello(tmp_path: Path):
    """Without a token, a new connection costs no round trip before the first request."""
    from filesrv.protocol import FrameBuffer, encode_frame, error_reply, greeting
    from filesrv.errors import NotFound
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    seen: list[str] = []

    def fake_server() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        frames = FrameBuffer()
        headers: list[dict] = []
        while len(headers) < 2:  # nothing is sent until both frames are in
            data = conn.recv(65536)
            if not data:
                break
            frames.feed(data)
            while (header := frames.next_header()) is not None:
                headers.append(header)
        seen.extend(str(h.get("op")) for h in headers)
        conn.sendall(encode_frame(greeting("fake", None)) + encode_frame(greeting("fake", None))
                     + encode_frame(error_reply(NotFound("no such file: 'x'"))))
        conn.close()

    thread = threading.Thread(target=fake_server)
    thread.start()
    try:
        with Client("127.0.0.1", listener.getsockname()[1], timeout=10, retries=0) as client:
            try:
                client.stat("x")
                raise AssertionError("the fake server's not_found was not raised")
            except NotFound:
                pass
    finally:
        thread.join(timeout=20)
        listener.close()
    assert seen == ["hello", "stat"]


def test_daemon_without_tls_does_not_load_ssl(daemon):
    # every MiB the daemon holds is copied into each connection's fork
    assert daemon.proc is not None
    maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
    assert "xxhash" in maps  # the maps are the daemon's: its extension modules show
    assert "_ssl" not in maps and "libssl" not in maps


def test_get_r_with_fsync_flushes_a_batch_at_once_not_each_file(daemon, tmp_path: Path):
    for i in range(300):
        random_file(daemon.root / "t" / f"d{i % 3}" / f"f{i:03d}.bin", 1000 + i)
    calls: Counter = Counter()

    def profile(frame, event, arg) -> None:
        if event == "call" and frame.f_code.co_name == "flush_filesystem":
            calls["flush_filesystem"] += 1
        elif event == "c_call" and getattr(arg, "__name__", "") in ("fsync", "fdatasync"):
            calls["fsync"] += 1

    import sys
    with Client("127.0.0.1", daemon.port, durable=True) as client:
        client.ls("")
        sys.setprofile(profile)
        try:
            results = client.get_tree("t", str(tmp_path / "copy"))
        finally:
            sys.setprofile(None)
    assert len(results) == 300
    for p in (daemon.root / "t").rglob("*.bin"):
        assert xxh128_of(tmp_path / "copy" / p.relative_to(daemon.root / "t")) == xxh128_of(p)
    batches = -(-300 // 256)  # DURABLE_BATCH_FILES a batch
    assert calls["fsync"] == 0 and calls["flush_filesystem"] == 2 * batches, calls


class Relay:
    """A loopback relay to a daemon that counts the reads of the client's bytes, and lets
    no byte of a first get_files reply through until the client has sent a second
    get_files request (or `patience` seconds pass)."""

    def __init__(self, upstream_port: int, patience: float = 10.0) -> None:
        from filesrv.protocol import FrameBuffer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.upstream_port = upstream_port
        self.patience = patience
        self.requests = FrameBuffer()
        self.get_files_seen = 0
        self.client_reads = 0
        self.first_asked = threading.Event()
        self.second_asked = threading.Event()
        self.threads = [threading.Thread(target=self._run)]
        self.threads[0].start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        down = threading.Thread(target=self._downstream, args=(server, client))
        down.start()
        self.threads.append(down)
        with client, server:
            client.settimeout(30)
            while data := client.recv(65536):  # the client's side ends when it closes
                self.client_reads += 1
                self._count(data)  # before forwarding: no reply can precede the count
                server.sendall(data)
            server.shutdown(socket.SHUT_WR)
            down.join(timeout=30)

    def _count(self, data: bytes) -> None:
        self.requests.feed(data)
        while (header := self.requests.next_header()) is not None:
            if header.get("op") == "get_files":
                self.get_files_seen += 1
                (self.first_asked if self.get_files_seen == 1 else self.second_asked).set()

    def _downstream(self, server: socket.socket, client: socket.socket) -> None:
        server.settimeout(30)
        held = False
        try:
            while data := server.recv(65536):
                if self.first_asked.is_set() and not held:
                    self.second_asked.wait(self.patience)
                    held = True
                client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        for t in self.threads:
            t.join(timeout=30)
        self.listener.close()


def test_get_r_asks_for_the_next_batch_before_reading_this_one(daemon, tmp_path: Path):
    """The server prepares batch k+1 while the client writes batch k to disk."""
    for i in range(20):  # 20 x 600 KiB: two batches of at most 8 MiB
        random_file(daemon.root / "t" / f"f{i:02d}.bin", 600 * 1024)
    relay = Relay(daemon.port)
    try:
        with Client("127.0.0.1", relay.port, timeout=30, retries=0) as client:
            results = client.get_tree("t", str(tmp_path / "copy"))
    finally:
        relay.close()
    assert len(results) == 20
    for p in (daemon.root / "t").iterdir():
        assert xxh128_of(tmp_path / "copy" / p.name) == xxh128_of(p)
    # the second request was sent before a byte of the first reply was let through
    assert relay.get_files_seen == 2 and relay.second_asked.is_set()


def test_hash_r_sends_its_stat_requests_many_at_a_time(daemon, tmp_path: Path):
    for i in range(300):
        random_file(daemon.root / "t" / f"d{i % 4}" / f"f{i:03d}.bin", 100 + i)
    relay = Relay(daemon.port)
    try:
        with Client("127.0.0.1", relay.port, timeout=30, retries=0) as client:
            digests = {name: digest for name, _, digest in client.hash_tree("t")}
    finally:
        relay.close()
    assert digests == {str(p.relative_to(daemon.root / "t")): xxh128_of(p)
                       for p in (daemon.root / "t").rglob("*.bin")}
    # one request a round trip would take 300 reads; 32 KiB of them at once, a few
    assert relay.client_reads <= 30, relay.client_reads
