"""The daemon under concurrency, limits and hostile input."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from conftest import (RawConnection, cli, cli_json, random_file, start_cli, wait_for,
                      xxh128_of)
from filesrv.protocol import Commit, Data, Get, Put


def serves_normally(daemon, tmp_path: Path) -> bool:
    probe = tmp_path / "probe.bin"
    if not probe.exists():
        random_file(probe, 1000)
    put = cli_json("put", "-s", daemon.address, str(probe), "probe.bin")
    return put["xxh128"] == xxh128_of(probe) and daemon.alive()


# ------------------------------------------------------------------ hostile bytes

@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\xff" + b"x" * 100,          # oversized length prefix
    struct.pack(">I", 50) + b"{\"op\":",        # truncated frame, then close
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",       # the wrong protocol
    os.urandom(4096),                           # noise
    struct.pack(">I", 4) + b"null",            # JSON that is not an object
])
def test_garbage_frames_leave_the_daemon_serving_everyone_else(daemon, tmp_path, garbage):
    conn = RawConnection(daemon.port, handshake=False)
    try:
        assert conn.read_header()["ok"] is True  # greeting
        conn.send(garbage)
        conn.sock.shutdown(socket.SHUT_WR)  # and hang up, as a broken client would
        assert conn.closed_by_server()
    finally:
        conn.close()
    assert serves_normally(daemon, tmp_path)


def test_garbage_after_the_handshake_gets_bad_request(daemon, tmp_path):
    conn = RawConnection(daemon.port)
    try:
        conn.send(b"\x00\x10\x00\x00")  # 1 MiB header announced
        reply = conn.read_header()
        assert reply["ok"] is False and reply["code"] == "bad_request"
        assert conn.closed_by_server()
    finally:
        conn.close()
    assert serves_normally(daemon, tmp_path)


@pytest.mark.parametrize("header,code", [
    ({"op": "get", "path": "../../etc/passwd", "offset": 0}, "bad_path"),
    ({"op": "get", "path": "a/../../x", "offset": 0}, "bad_path"),
    ({"op": "get", "path": "x\u0000y", "offset": 0}, "bad_path"),
    ({"op": "get", "path": "/etc/passwd", "offset": 0}, "not_found"),  # "/" is the root
    ({"op": "get", "path": "x", "offset": -1}, "bad_request"),
    ({"op": "get", "path": "x", "offset": "0"}, "bad_request"),
    ({"op": "put", "path": "../evil", "size": 1, "source": "s"}, "bad_path"),
    ({"op": "put", "path": "x", "size": -1, "source": "s"}, "bad_request"),
    ({"op": "ls", "path": "../"}, "bad_path"),
    ({"op": "commit", "xxh128": "0" * 32}, "bad_request"),  # out of place
    ({"op": "launch"}, "bad_request"),
])
def test_refused_requests_get_their_code_and_keep_the_connection(daemon, tmp_path, header,
                                                                 code):
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    conn = RawConnection(daemon.port)
    try:
        reply = conn.request(header)
        assert reply["ok"] is False and reply["code"] == code, reply
        assert reply["message"]
        assert conn.request({"op": "ls", "path": ""})["ok"] is True  # still usable
    finally:
        conn.close()
    assert sorted(str(p) for p in tmp_path.rglob("*") if "daemon" not in p.name) == \
        [p for p in before if "daemon" not in p]


def test_symlinks_out_of_the_root_are_refused_over_the_wire(daemon, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (daemon.root / "out").symlink_to(outside)
    (daemon.root / "pw").symlink_to(outside / "secret")
    for remote in ("out/secret", "pw"):
        r = cli("get", "-s", daemon.address, remote, str(tmp_path / "x"), check=False)
        assert r.returncode == 5 and "outside the root" in r.stderr
    src = random_file(tmp_path / "evil.bin", 10)
    r = cli("put", "-s", daemon.address, str(src), "out/evil.bin", check=False)
    assert r.returncode == 5
    assert os.listdir(outside) == ["secret"]
    assert cli_json("ls", "-s", daemon.address) == []


def test_put_announcing_more_bytes_than_it_sends_places_nothing(daemon_factory, tmp_path):
    daemon = daemon_factory("--idle-timeout", "1")
    conn = RawConnection(daemon.port)
    try:
        assert conn.request(Put(path="short.bin", size=100, source="s").header())["ok"]
        conn.send(Data(length=100).frame() + b"x" * 40)
        assert conn.closed_by_server()  # idle timeout
    finally:
        conn.close()
    assert not (daemon.root / "short.bin").exists()
    assert serves_normally(daemon, tmp_path)


def test_put_with_a_wrong_digest_is_refused_and_places_nothing(daemon, tmp_path):
    conn = RawConnection(daemon.port)
    try:
        assert conn.request(Put(path="bad.bin", size=3, source="s").header())["offset"] == 0
        conn.send(Data(length=3).frame() + b"abc")
        reply = conn.request(Commit(xxh128="0" * 32).header())
        assert reply["code"] == "integrity"
    finally:
        conn.close()
    assert not (daemon.root / "bad.bin").exists()


def test_get_offset_past_the_end_is_refused(daemon, tmp_path):
    (daemon.root / "f").write_bytes(b"12345")
    conn = RawConnection(daemon.port)
    try:
        assert conn.request(Get(path="f", offset=6).header())["code"] == "bad_range"
        reply = conn.request(Get(path="f", offset=5).header())
        assert reply["ok"] and reply["length"] == 0
    finally:
        conn.close()


def test_many_commands_share_one_connection(daemon, tmp_path):
    for i in range(100):
        (daemon.root / f"f{i}").write_bytes(b"x" * i)
    from filesrv.client import Client
    with Client("127.0.0.1", daemon.port) as client:
        for i in range(100):
            assert client.get(f"f{i}", str(tmp_path / f"f{i}")).size == i
        assert len(client.ls("")) == 100
    gets = [line for line in daemon.log_text().splitlines() if " get " in line]
    assert len(gets) == 100 and len({line.split()[1] for line in gets}) == 1  # one peer


# ------------------------------------------------------------------ concurrency and limits

def test_sixteen_concurrent_clients(daemon, tmp_path):
    sources = [random_file(tmp_path / f"s{i}.bin", 512 * 1024 + i) for i in range(8)]
    for i in range(8, 16):
        random_file(daemon.root / f"s{i}.bin", 512 * 1024 + i)
    procs = [start_cli("put", "-s", daemon.address, str(s), "--json") for s in sources]
    procs += [start_cli("get", "-s", daemon.address, f"s{i}.bin", str(tmp_path / f"g{i}.bin"),
                        "--json") for i in range(8, 16)]
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    for s in sources:
        assert xxh128_of(daemon.root / s.name) == xxh128_of(s)
    for i in range(8, 16):
        assert xxh128_of(tmp_path / f"g{i}.bin") == xxh128_of(daemon.root / f"s{i}.bin")


def test_concurrent_puts_to_one_name_never_interleave(daemon, tmp_path):
    sources = [random_file(tmp_path / f"v{i}.bin", 2 * 1024 * 1024) for i in range(8)]
    procs = [start_cli("put", "-s", daemon.address, str(s), "same.bin") for s in sources]
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    assert xxh128_of(daemon.root / "same.bin") in {xxh128_of(s) for s in sources}
    assert list((daemon.root / ".filesrv" / "partials").iterdir()) == []


def test_readers_see_the_old_file_or_the_new_one_whole(daemon, tmp_path):
    versions = [random_file(tmp_path / f"v{i}.bin", 1024 * 1024) for i in range(2)]
    digests = {xxh128_of(v) for v in versions}
    cli("put", "-s", daemon.address, str(versions[0]), "r.bin")
    writer = start_cli("put", "-s", daemon.address, "--limit-rate", "4M", str(versions[1]),
                       "r.bin")
    for i in range(5):
        got = cli_json("get", "-s", daemon.address, "r.bin", str(tmp_path / f"read{i}"))
        assert got["xxh128"] in digests
        assert xxh128_of(tmp_path / f"read{i}") == got["xxh128"]
    assert writer.wait(timeout=60) == 0


def test_beyond_max_children_a_client_gets_busy_at_once(daemon_factory, tmp_path):
    daemon = daemon_factory("--max-children", "2")
    # each holder has had its hello answered: two children are serving, the limit is reached
    holders = [RawConnection(daemon.port) for _ in range(2)]
    try:
        started = time.monotonic()
        extra = RawConnection(daemon.port, handshake=False)
        reply = extra.read_header()
        assert reply["ok"] is False and reply["code"] == "busy"
        assert time.monotonic() - started < 2.0
        extra.close()
        refused = cli("ls", "-s", daemon.address, "--timeout", "1", check=False)
        assert refused.returncode == 8 and "busy" in refused.stderr
        assert "gave up after" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        for h in holders:
            h.close()
    wait_for(lambda: cli("ls", "-s", daemon.address, check=False).returncode == 0,
             what="a slot to free up")


def test_idle_connection_is_closed_even_before_its_first_header(daemon_factory, tmp_path):
    daemon = daemon_factory("--idle-timeout", "1")
    silent = RawConnection(daemon.port, handshake=False)
    half = RawConnection(daemon.port, handshake=False)
    try:
        silent.read_header()
        half.read_header()
        half.send(b"\x00\x00")  # half a length prefix, then nothing
        started = time.monotonic()
        assert silent.closed_by_server() and half.closed_by_server()
        assert time.monotonic() - started < 8
    finally:
        silent.close()
        half.close()
    assert serves_normally(daemon, tmp_path)


def test_sigterm_stops_the_daemon_with_status_zero(daemon_factory, tmp_path):
    daemon = daemon_factory()
    idle = RawConnection(daemon.port)  # a child is serving when the signal comes
    try:
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=15) == 0
        assert idle.closed_by_server()
    finally:
        idle.close()


def test_one_log_line_per_command(daemon, tmp_path):
    from filesrv.client import Client
    from filesrv.errors import NotFound
    src = random_file(tmp_path / "l.bin", 1234)
    with Client("127.0.0.1", daemon.port) as client:  # five commands over one connection
        client.put(str(src), "l.bin")
        peer = "%s:%d" % client.channel.sock.getsockname()[:2]
        client.mkdir("d")
        client.ls("")
        with pytest.raises(NotFound):
            client.get("missing", str(tmp_path / "m"))
        client.stat("l.bin")

    def lines() -> list[str]:
        return [line.split(f" {peer} ", 1)[1] for line in daemon.log_text().splitlines()
                if f" {peer} " in line]
    # one child serves the connection in order: once stat's line is there, all are; a
    # later command's line then shows that the connection's end added none
    wait_for(lambda: any(line.startswith("stat ") for line in lines()), what="stat's line")
    cli("ls", "-s", daemon.address)
    wait_for(lambda: daemon.log_text().rstrip().endswith("ok") and
             daemon.log_text().count(" ls ") == 2, what="the later command's line")
    assert [(line.split()[0], line.split()[-1]) for line in lines()] == [
        ("put", "ok"), ("mkdir", "ok"), ("ls", "ok"), ("get", "not_found"), ("stat", "ok")]
    assert lines()[0].startswith("put 'l.bin' bytes=1234 ")


# ------------------------------------------------------------------ the CLI's failures

def test_expected_failures_give_one_line_and_a_status_without_traceback(daemon, tmp_path):
    cases = [
        (["get", "-s", daemon.address, "missing.bin", str(tmp_path / "m")], 4, "no such file"),
        (["put", "-s", daemon.address, str(tmp_path / "nope.bin")], 9, "cannot open"),
        (["get", "-s", daemon.address, "../x"], 5, "not allowed"),
        (["ls", "-s", daemon.address, "missing"], 4, "no such directory"),
        (["ls", "-s", "127.0.0.1:1"], 3, "cannot connect"),
        (["ls", "-s", "localhost:http"], 2, "bad port"),
        (["put", "-s", daemon.address, "--limit-rate", "fast", "x"], 2, "not a size"),
    ]
    for args, status, text in cases:
        r = cli(*args, check=False, cwd=tmp_path)
        assert r.returncode == status, (args, r.stderr)
        assert text in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
        if status != 2:
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_get_of_a_directory_and_put_onto_one_are_refused(daemon, tmp_path):
    (daemon.root / "d").mkdir()
    r = cli("get", "-s", daemon.address, "d", str(tmp_path / "x"), check=False)
    assert r.returncode == 4 and "is a directory" in r.stderr
    src = random_file(tmp_path / "f.bin", 10)
    (daemon.root / "d" / "f.bin").mkdir()  # put f.bin d goes inside d, as cp does
    r = cli("put", "-s", daemon.address, str(src), "d", check=False)
    assert r.returncode == 4 and "is a directory" in r.stderr
    assert not list(tmp_path.glob(".x.filesrv-part*"))


def test_help_teaches_the_commands(tmp_path):
    out = cli("--help").stdout
    for word in ("serve", "put", "get", "ls", "resume", "xxh128sum", "exit status"):
        assert word in out
    assert "--limit-rate" in cli("get", "--help").stdout
    assert "--max-children" in cli("serve", "--help").stdout


def test_a_client_speaking_another_protocol_version_is_refused_cleanly(daemon, tmp_path):
    conn = RawConnection(daemon.port, handshake=False)
    try:
        assert conn.read_header()["version"] == 1
        reply = conn.request({"op": "hello", "version": 2, "agent": "future"})
        assert reply["ok"] is False and reply["code"] == "version"
        assert "version 2" in reply["message"]
        assert conn.closed_by_server()
    finally:
        conn.close()
    assert serves_normally(daemon, tmp_path)


def test_the_first_request_must_be_hello(daemon):
    conn = RawConnection(daemon.port, handshake=False)
    try:
        conn.read_header()
        reply = conn.request({"op": "ls", "path": ""})
        assert reply["code"] == "bad_request"
        assert conn.closed_by_server()
    finally:
        conn.close()
