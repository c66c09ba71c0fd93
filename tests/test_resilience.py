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
