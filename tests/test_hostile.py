"""Hostile clients: fuzzed frames, wrong types in every field, path tricks, path races."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RawConnection, random_file, start_cli, wait_for, xxh128_of
from filesrv.client import Client
from filesrv.errors import BadPath
from filesrv.protocol import (Commit, Data, Get, GetFiles, Hello, ListDir, MakeDir, Move, Put,
                              PutFiles, Remove, Stat, encode_frame)

CORPUS = [
    Hello().header(),
    {"op": "auth", "proof": "ab" * 32},
    ListDir(path="").header(),
    ListDir(path="dir").header(),
    Get(path="file.bin", offset=0).header(),
    Get(path="file.bin", offset=3, if_match="x").header(),
    Put(path="up.bin", size=5, source="s").header(),
    Data(length=5).header(),
    Commit(xxh128="0" * 32).header(),
    # management ops on names that do not exist, so a valid one changes nothing
    Stat(path="file.bin").header(),
    Remove(path="nope", recursive=True).header(),
    Move(src="nope", dst="moved").header(),
    MakeDir(path="nope/deeper").header(),
    PutFiles([{"path": "up.bin", "size": 5, "xxh128": "0" * 32}]).header(),
    GetFiles([{"path": "file.bin", "xxh128": None}, {"path": "nope", "xxh128": "0" * 32}]
             ).header(),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=8)


@st.composite
def hostile_frames(draw) -> bytes:
    header = dict(draw(st.sampled_from(CORPUS)))
    kind = draw(st.sampled_from(["replace", "drop", "add", "raw", "truncate", "flip",
                                 "prefix", "valid"]))
    if kind == "replace":
        header[draw(st.sampled_from(sorted(header)))] = draw(json_values)
    elif kind == "drop":
        header.pop(draw(st.sampled_from(sorted(header))))
    elif kind == "add":
        header[draw(st.text(max_size=10))] = draw(json_values)
    elif kind == "raw":
        return draw(st.binary(max_size=300))
    frame = encode_frame(header)
    if kind == "truncate":
        return frame[: draw(st.integers(0, len(frame) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(frame) - 1))
        return frame[:i] + bytes([frame[i] ^ draw(st.integers(1, 255))]) + frame[i + 1:]
    if kind == "prefix":
        return struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + frame[4:]
    return frame + draw(st.binary(max_size=20))  # a valid frame, maybe with stray bytes


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    from conftest import Daemon
    tmp = tmp_path_factory.mktemp("fuzz")
    root = tmp / "root"
    random_file(root / "file.bin", 4096)
    (root / "dir").mkdir()
    d = Daemon(root, tmp / "daemon.log", "--idle-timeout", "2", "--handshake-timeout", "2")
    d.start()
    yield d
    d.stop()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(handshake=st.booleans(), frames=st.lists(hostile_frames(), min_size=1, max_size=3))
def test_fuzzed_frames_never_break_the_daemon(fuzz_daemon, handshake, frames):
    conn = RawConnection(fuzz_daemon.port, handshake=handshake, timeout=0.3)
    try:
        for frame in frames:
            conn.send(frame)
        conn.sock.shutdown(socket.SHUT_WR)
        conn.closed_by_server()  # read whatever comes back, briefly
    except OSError:
        pass
    finally:
        conn.close()
    with Client("127.0.0.1", fuzz_daemon.port, timeout=10) as client:
        assert [e.name for e in client.ls("")] == ["dir", "file.bin"]
    assert fuzz_daemon.alive()
    # every bad input so far was a clean refusal (checked after each example, so the
    # failing one is the one reported)
    log = fuzz_daemon.log_text()
    assert "internal" not in log and "Traceback" not in log


def test_requests_missing_a_field_are_bad_requests_not_internal_errors(daemon):
    """Order-independent: its own daemon, its own inputs (each request of the corpus with
    one field dropped, after a handshake), so it proves parsing is reached and clean."""
    random_file(daemon.root / "file.bin", 4096)
    refused = 0
    for base in CORPUS[2:]:
        for key in sorted(set(base) - {"op"}):
            conn = RawConnection(daemon.port)
            try:
                reply = conn.request({k: v for k, v in base.items() if k != key})
            finally:
                conn.close()
            # without an optional field (recursive, if_match...) a request is still valid
            # and gets its usual answer; without a required one, bad_request
            assert reply["ok"] or reply["code"] in ("bad_request", "not_found"), (
                base, key, reply)
            refused += not reply["ok"] and reply["code"] == "bad_request"
    assert refused >= 15
    log = daemon.log_text()
    assert log.count("bad_request") >= refused
    assert "internal" not in log and "Traceback" not in log


# ------------------------------------------------------------------ every field, every type

WRONG_VALUES = [None, True, -1, 1.5, "7", [], {}, 2**64, "\x00"]


def is_wrong(key: str, value, original) -> bool:
    if key == "if_match":  # optional: null or any string is valid
        return not (value is None or isinstance(value, str))
    if key in ("recursive", "parents"):  # optional flags: null means false
        return not (value is None or isinstance(value, bool))
    if isinstance(value, bool) or type(value) is not type(original):
        return True
    if isinstance(value, int):
        return value < 0 or value >= 2**63
    return key == "path" and "\x00" in value


def wrong_typed_requests():
    for base in CORPUS[2:]:
        for key in sorted(base):
            if key != "op":
                for value in WRONG_VALUES:
                    if is_wrong(key, value, base[key]):
                        yield {**base, key: value}


def tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1)
                  for p in root.rglob("*") if ".filesrv" not in p.parts)


def test_wrong_types_in_every_field_are_refused_and_change_nothing(daemon):
    random_file(daemon.root / "file.bin", 100)
    (daemon.root / "dir").mkdir()
    before = tree(daemon.root)
    conn = RawConnection(daemon.port)
    refused = 0
    try:
        for header in wrong_typed_requests():
            reply = conn.request(header)
            assert reply.get("code") in ("bad_request", "bad_path"), (header, reply)
            refused += 1
    finally:
        conn.close()
    assert refused > 60
    assert tree(daemon.root) == before


@pytest.mark.parametrize("path,code", [
    ("..", "bad_path"), ("../x", "bad_path"), ("a/../../x", "bad_path"),
    ("a//b", "bad_path"), ("x/", "bad_path"), ("nul\x00byte", "bad_path"),
    ("n" * 256, "bad_path"), ("d/" + "n" * 256, "bad_path"), ("/", "bad_path"),
    (".filesrv/partials/x.part", "bad_path"), ("dir", "is_a_directory"),
    ("file.bin/x", "not_a_directory"), ("escape/x", "bad_path"), ("link", "bad_path"),
])
def test_path_tricks_get_their_code_and_change_nothing(daemon, tmp_path, path, code):
    random_file(daemon.root / "file.bin", 100)
    (daemon.root / "dir").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_bytes(b"outside")
    (daemon.root / "escape").symlink_to(outside)
    (daemon.root / "link").symlink_to(outside / "x")
    before = tree(daemon.root), sorted(os.listdir(outside))
    conn = RawConnection(daemon.port)
    try:
        put = conn.request(Put(path=path, size=3, source="s").header())
        assert put["ok"] is False and put["code"] == code, put
        get = conn.request(Get(path=path).header())
        expected_get = {"dir": "is_a_directory"}.get(path, code)
        if path == "file.bin/x":
            expected_get = "not_a_directory"
        assert get["ok"] is False and get["code"] == expected_get, get
    finally:
        conn.close()
    assert (tree(daemon.root), sorted(os.listdir(outside))) == before
    assert (outside / "x").read_bytes() == b"outside"


# ------------------------------------------------------------------ races on the path

def test_parent_swapped_for_a_symlink_mid_put_cannot_write_outside(daemon, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    src = random_file(tmp_path / "f.bin", 4 * 1024 * 1024)
    (daemon.root / "a" / "b").mkdir(parents=True)
    put = start_cli("put", "-s", daemon.address, "--limit-rate", "4M", str(src), "a/b/f.bin")
    wait_for(lambda: any((daemon.root / ".filesrv" / "partials").glob("*.part")),
             what="the upload to start")
    os.rename(daemon.root / "a" / "b", daemon.root / "a" / "b.orig")
    (daemon.root / "a" / "b").symlink_to(outside)
    assert put.wait(timeout=60) == 5
    assert "outside the root" in put.stderr.read()
    assert os.listdir(outside) == []
    assert os.listdir(daemon.root / "a" / "b.orig") == []


def test_parent_swapped_for_a_symlink_mid_get_cannot_read_outside(daemon, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    random_file(outside / "f.bin", 4 * 1024 * 1024)
    inside = random_file(daemon.root / "a" / "b" / "f.bin", 4 * 1024 * 1024)
    expected = xxh128_of(inside)
    dest = tmp_path / "got.bin"
    get = start_cli("get", "-s", daemon.address, "--limit-rate", "4M", "a/b/f.bin", str(dest),
                    "--json")
    partial = tmp_path / ".got.bin.filesrv-part"
    # bytes have arrived: the server opened the file before the swap
    wait_for(lambda: partial.exists() and partial.stat().st_size > 0, what="the download")
    os.rename(daemon.root / "a" / "b", daemon.root / "a" / "b.orig")
    (daemon.root / "a" / "b").symlink_to(outside)
    assert get.wait(timeout=60) == 0
    assert xxh128_of(dest) == expected == json.loads(get.stdout.read())["xxh128"]


def test_symlink_flipping_between_inside_and_outside_never_leaks(daemon, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.bin").write_bytes(b"OUTSIDE")
    (daemon.root / "real").mkdir()
    (daemon.root / "real" / "f.bin").write_bytes(b"inside!")
    link = daemon.root / "flip"
    link.symlink_to("real")
    stop = threading.Event()

    def flipper() -> None:
        targets = ["real", str(outside)]
        for i in range(20_000):  # bounded
            if stop.is_set():
                return
            tmp = daemon.root / "flip.tmp"
            tmp.symlink_to(targets[i % 2])
            os.replace(tmp, link)

    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    seen = {"inside": 0, "refused": 0}
    try:
        with Client("127.0.0.1", daemon.port) as client:
            for _ in range(300):
                try:
                    client.get("flip/f.bin", str(tmp_path / "out.bin"))
                except BadPath:
                    seen["refused"] += 1
                    continue
                assert (tmp_path / "out.bin").read_bytes() == b"inside!"
                seen["inside"] += 1
    finally:
        stop.set()
        thread.join(timeout=10)
    assert seen["inside"] > 0 and seen["refused"] > 0, seen
