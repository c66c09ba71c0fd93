"""The daemon survives what a disk, a log or its own processes can do to it: a log that
cannot be written, a SIGKILL with connections open, a SIGTERM with a transfer in flight,
start-up errors, and unauthenticated clients holding slots."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from conftest import Daemon, RawConnection, cli, random_file, wait_for
from filesrv.client import Client
from filesrv.protocol import Hello


def children_of(pid: int) -> list[int]:
    """The live (not zombie) child processes of `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(params=["/dev/full", "pipe whose reader goes away"])
def broken_log(request):
    """(where the daemon's stderr goes, a function that breaks it): every write then fails
    with ENOSPC (/dev/full, from the start) or EPIPE (once the pipe's reader is closed)."""
    if request.param == "/dev/full":
        yield Path("/dev/full"), lambda: None
        return
    read_end, write_end = os.pipe()
    reader = [read_end]

    def close_reader() -> None:
        os.close(reader.pop())

    try:
        yield Path(f"/proc/self/fd/{write_end}"), close_reader
    finally:
        os.close(write_end)
        for fd in reader:
            os.close(fd)


def test_a_broken_log_never_stops_the_service(broken_log, tmp_path):
    log_path, break_log = broken_log
    daemon = Daemon(tmp_path / "root", log_path, "--max-children", "2", "--grace", "5").start()
    try:
        break_log()
        src = random_file(tmp_path / "a.bin", 70_000)
        with Client("127.0.0.1", daemon.port, timeout=10) as client:  # one child, many commands
            client.put(str(src), "a.bin")
            client.put(str(src), "b.bin")
            assert sorted(e.name for e in client.ls("")) == ["a.bin", "b.bin"]
        wait_for(lambda: not children_of(daemon.proc.pid), what="the client's child to end")
        holders = [RawConnection(daemon.port) for _ in range(2)]
        try:
            for _ in range(3):  # beyond --max-children: busy refusals, each logged (or not)
                extra = RawConnection(daemon.port, handshake=False)
                assert extra.read_header()["code"] == "busy"
                extra.close()
            assert daemon.alive()
        finally:
            for h in holders:
                h.close()
        wait_for(lambda: cli("ls", "-s", daemon.address, check=False).returncode == 0,
                 what="the daemon to serve again after the busy refusals")
        idle = RawConnection(daemon.port)  # a child is serving when SIGTERM comes
        wait_for(lambda: len(children_of(daemon.proc.pid)) == 1, what="the child")
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=30) == 0
        assert idle.closed_by_server()
        idle.close()
        wait_for(lambda: group_is_gone(daemon.proc.pid), what="every child to be gone")
    finally:
        daemon.stop()


# ------------------------------------------------------------------ the listening socket

def refused(port: int) -> bool:
    """True when a connection to the port is refused at once (nobody listens)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_after_a_sigkill_of_the_daemon_its_port_is_free_at_once(tmp_path):
    first = Daemon(tmp_path / "root", tmp_path / "first.log").start()
    second = None
    held = RawConnection(first.port)  # a child serves it, and outlives its parent
    try:
        wait_for(lambda: len(children_of(first.proc.pid)) == 1, what="the child")
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=10)
        assert refused(first.port)  # not queued for a process that will never accept
        second = Daemon(tmp_path / "root", tmp_path / "second.log",
                        "--port", str(first.port)).start()
        assert second.port == first.port
        with Client("127.0.0.1", second.port, timeout=10) as client:
            assert client.ls("") == []
    finally:
        held.close()
        first.stop()  # and the orphaned child, by its process group
        if second is not None:
            second.stop()


def test_a_draining_daemon_refuses_new_connections_at_once(daemon_factory, tmp_path):
    from conftest import start_cli, upload_partial_over
    daemon = daemon_factory("--grace", "60")
    src = random_file(tmp_path / "big.bin", 8 * 1024 * 1024)
    put = start_cli("put", "-s", daemon.address, "--limit-rate", "1M", str(src), "big.bin")
    try:
        wait_for(upload_partial_over(daemon, 0), what="the upload to start")
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping" in daemon.log_text(), what="the drain to start")
        wait_for(lambda: refused(daemon.port), timeout=5, what="new connections refused")
        assert put.poll() is None  # refused during the grace period, not after it
        assert put.wait(timeout=60) == 0  # the transfer in flight finishes
        assert daemon.proc.wait(timeout=30) == 0
    finally:
        if put.poll() is None:
            put.kill()
            put.wait(timeout=10)


# ------------------------------------------------------------------ start-up errors

@pytest.fixture
def busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("case", ["port in use", "port out of range", "negative port",
                                  "host does not resolve", "root is a file",
                                  "root cannot be created", "token file unreadable",
                                  "TLS files bad"])
def test_start_up_errors_are_one_line_and_exit_2(case, tmp_path, busy_port):
    root = tmp_path / "root"
    (tmp_path / "file").write_text("x")
    args = {
        "port in use": ["--port", str(busy_port)],
        "port out of range": ["--port", "70000"],
        "negative port": ["--port", "-1"],
        "host does not resolve": ["--host", "no-such-host.invalid"],
        "root is a file": ["--root", str(tmp_path / "file")],
        "root cannot be created": ["--root", str(tmp_path / "file" / "sub")],
        "token file unreadable": ["--token-file", str(tmp_path / "missing")],
        "TLS files bad": ["--tls-cert", str(tmp_path / "file"),
                          "--tls-key", str(tmp_path / "file")],
    }[case]
    options = {"--root": str(root), "--port": "0", "--host": "127.0.0.1",
               **dict(zip(args[::2], args[1::2]))}
    r = cli("serve", *[item for pair in options.items() for item in pair], check=False,
            timeout=30)
    assert r.returncode == 2, (case, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("filesrv: "), lines


# ------------------------------------------------------------------ unauthenticated slots

TOKEN = "resilience-token-5e2a"


def test_silent_unauthenticated_sockets_never_lock_out_a_client_with_the_token(
        daemon_factory, tmp_path):
    import threading
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    daemon = daemon_factory("--token-file", str(tokens), "--max-children", "8")
    stop = threading.Event()
    connections = [0]

    def silent_reconnecting_socket() -> None:
        """Connect, say nothing, and when dropped, reconnect about a second later."""
        for _ in range(200):  # bounded
            if stop.is_set():
                return
            try:
                with socket.create_connection(("127.0.0.1", daemon.port), timeout=1) as s:
                    connections[0] += 1
                    while not stop.is_set():
                        try:
                            if not s.recv(65536):
                                break  # dropped (or refused busy)
                        except socket.timeout:
                            continue
            except OSError:
                pass
            stop.wait(1.0)

    attackers = [threading.Thread(target=silent_reconnecting_socket, daemon=True)
                 for _ in range(8)]
    for t in attackers:
        t.start()
    try:
        wait_for(lambda: connections[0] >= 12, what="the silent sockets to hold the slots")
        for _ in range(5):  # each served at once, not after the silent sockets' timeout
            with Client("127.0.0.1", daemon.port, timeout=2, token=TOKEN.encode()) as client:
                assert client.ls("") == []
            time.sleep(0.3)
        assert len(children_of(daemon.proc.pid)) <= 8
    finally:
        stop.set()
        for t in attackers:
            t.join(timeout=5)
    assert "dropped: the oldest of too many unauthenticated" in daemon.log_text()


def test_a_flood_of_short_connections_never_cuts_a_client_in_its_handshake(daemon_factory):
    """A connection in its handshake for less than HANDSHAKE_SHIELD_SECONDS is never
    dropped to make room: the newcomers are refused as busy (their clients wait and
    retry) instead of evicting a real client between its greeting and its hello."""
    daemon = daemon_factory("--max-children", "2")  # at most 1 connection in handshake
    client = RawConnection(daemon.port, handshake=False)
    assert client.read_header()["ok"] is True  # the greeting: now in its handshake
    try:
        for _ in range(5):  # a burst of connections that arrive while it is young
            newcomer = RawConnection(daemon.port, handshake=False, timeout=5)
            try:
                assert newcomer.read_header()["code"] == "busy"
            finally:
                newcomer.close()
        client.send(Hello().frame())
        assert client.read_header()["ok"] is True  # never dropped
        assert client.request({"op": "ls", "path": ""})["ok"] is True
    finally:
        client.close()
