"""Hostile clients: fuzzed frames (before and after authentication), wrong types in every
field, malformed JSON, forged log lines, path tricks, path races."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RawConnection, random_file, start_cli, wait_for, xxh128_of
from filesrv.client import Client
from filesrv.errors import BadPath, BadRequest
from filesrv.protocol import (MAX_JSON_DEPTH, Commit, Data, FrameBuffer, Get, GetFiles, Hello,
                              ListDir, MakeDir, Move, Put, PutFiles, Remove, Stat, auth_proof,
                              decode_header, encode_frame)

TOKEN = "hostile-suite-token-4b1d"

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
# before authentication, also: no proof, and a request with a bad path in place of hello/auth
PRE_AUTH_CORPUS = CORPUS + [{"op": "auth", "proof": None}, ListDir(path="..").header()]
json_values = st.recursive(  # NaN and Infinity too: they go out as the bare words
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=8)


@st.composite
def hostile_frames(draw, corpus: list[dict] = CORPUS) -> bytes:
    header = dict(draw(st.sampled_from(corpus)))
    kind = draw(st.sampled_from(["replace", "drop", "add", "raw", "truncate", "flip",
                                 "prefix", "deep", "valid"]))
    if kind == "deep":  # a field nested in arrays or objects, up to far past any limit
        header[draw(st.sampled_from(sorted(header)))] = "@@deep@@"
        levels = draw(st.integers(1, 16_000))
        opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        nested = opening * levels + json.dumps(draw(json_values)) + closing * levels
        text = json.dumps(header, ensure_ascii=False).replace('"@@deep@@"', nested)
        return struct.pack(">I", len(text.encode())) + text.encode()
    if kind == "replace":
        header[draw(st.sampled_from(sorted(header)))] = draw(json_values)
    elif kind == "drop":
        header.pop(draw(st.sampled_from(sorted(header))))
    elif kind == "add":
        header[draw(st.text(max_size=10))] = draw(json_values)
    elif kind == "raw":
        return draw(st.binary(max_size=300))
    frame = loose_frame(header)
    if kind == "truncate":
        return frame[: draw(st.integers(0, len(frame) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(frame) - 1))
        return frame[:i] + bytes([frame[i] ^ draw(st.integers(1, 255))]) + frame[i + 1:]
    if kind == "prefix":
        return struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + frame[4:]
    return frame + draw(st.binary(max_size=20))  # a valid frame, maybe with stray bytes


def loose_frame(header: dict) -> bytes:
    """A frame as a careless sender makes it: NaN and Infinity written as bare words."""
    payload = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass")
    return struct.pack(">I", len(payload)) + payload


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


@pytest.fixture(scope="module")
def token_fuzz_daemon(tmp_path_factory):
    from conftest import Daemon
    tmp = tmp_path_factory.mktemp("fuzz-token")
    root = tmp / "root"
    random_file(root / "file.bin", 4096)
    (root / "dir").mkdir()
    tokens = tmp / "tokens"
    tokens.write_text(TOKEN + "\n")
    d = Daemon(root, tmp / "daemon.log", "--idle-timeout", "2", "--handshake-timeout", "2",
               "--token-file", str(tokens))
    d.start()
    yield d
    d.stop()


def send_and_collect(conn: RawConnection, frames: list[bytes]) -> list[dict]:
    """Send the frames, hang up, and return the complete replies that came back briefly."""
    received = b""
    try:
        for frame in frames:
            conn.send(frame)
        conn.sock.shutdown(socket.SHUT_WR)
        while chunk := conn.sock.recv(65536):
            received += chunk
    except OSError:  # reset, or the brief wait ended
        pass
    finally:
        conn.close()
    replies, frames_in = [], FrameBuffer()
    frames_in.feed(conn.buf + received)
    while (header := frames_in.next_header()) is not None:
        replies.append(header)
        if header.get("ok") is True and "length" in header:
            break  # a body follows (ls, get): stop reading frames here
    return replies


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(handshake=st.booleans(), frames=st.lists(hostile_frames(), min_size=1, max_size=3))
def test_fuzzed_frames_never_break_the_daemon(fuzz_daemon, handshake, frames):
    conn = RawConnection(fuzz_daemon.port, handshake=handshake, timeout=0.3)
    send_and_collect(conn, frames)
    with Client("127.0.0.1", fuzz_daemon.port, timeout=10) as client:
        assert [e.name for e in client.ls("")] == ["dir", "file.bin"]
    assert fuzz_daemon.alive()
    # every bad input so far was a clean refusal (checked after each example, so the
    # failing one is the one reported)
    log = fuzz_daemon.log_text()
    assert "internal" not in log and "Traceback" not in log


def authenticated(port: int, stage: str, timeout: float) -> RawConnection:
    """A raw connection to a token daemon, taken as far as `stage`: 'greeting' (next frame
    stands in for hello), 'hello' (in for auth) or 'auth' (authenticated)."""
    conn = RawConnection(port, handshake=False, timeout=10)
    nonce = conn.read_header()["auth"]["nonce"]
    if stage != "greeting":
        assert conn.request(Hello().header())["ok"] is True
    if stage == "auth":
        assert conn.request({"op": "auth", "proof": auth_proof(TOKEN.encode(), nonce)})["ok"]
    conn.sock.settimeout(timeout)
    return conn


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(stage=st.sampled_from(["greeting", "hello", "auth"]),
       frames=st.lists(hostile_frames(PRE_AUTH_CORPUS), min_size=1, max_size=3))
def test_fuzzed_frames_before_authentication_get_refused_cleanly(token_fuzz_daemon, stage,
                                                                  frames):
    replies = send_and_collect(authenticated(token_fuzz_daemon.port, stage, 0.3), frames)
    if stage != "auth":  # nothing but the handshake replies, or a refusal
        for reply in replies:
            assert reply.get("ok") is True or reply.get("code") in (
                "bad_request", "auth", "version"), (frames, reply)
        assert not any("length" in r or "need" in r or "count" in r for r in replies), replies
    with Client("127.0.0.1", token_fuzz_daemon.port, timeout=10, token=TOKEN.encode()) as client:
        assert [e.name for e in client.ls("")] == ["dir", "file.bin"]
    assert token_fuzz_daemon.alive()
    log = token_fuzz_daemon.log_text()  # after each example: the failing one is reported
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


# ------------------------------------------------------------------ before authentication

def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("payload,before_hello,before_auth", [
    ('{"op":"ls","path":".."}', "bad_request", "auth"),  # a request with a bad path
    ('{"op":"ls","path":""}', "bad_request", "auth"),
    ('{"op":"hello","version":1,"x":' + deep(5000) + "}", "bad_request", "bad_request"),
    ('{"op":"hello","version":1,"x":' + deep(MAX_JSON_DEPTH + 1) + "}",
     "bad_request", "bad_request"),
    ('{"op":"hello","version":1,"x":NaN}', "bad_request", "bad_request"),
    ('{"op":"auth","proof":null,"x":-Infinity}', "bad_request", "bad_request"),
    ('{"op":"auth","proof":"not hex"}', "bad_request", "bad_request"),
    ("[1,2]", "bad_request", "bad_request"),
], ids=["bad-path", "request", "deep", "just-too-deep", "nan", "infinity", "bad-proof",
        "array"])
def test_anything_in_place_of_hello_or_auth_is_refused_with_one_line(
        daemon_factory, tmp_path, payload, before_hello, before_auth):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    daemon = daemon_factory("--token-file", str(tokens))
    frame = struct.pack(">I", len(payload)) + payload.encode()
    for stage, code in (("greeting", before_hello), ("hello", before_auth)):
        conn = authenticated(daemon.port, stage, 10)
        try:
            conn.send(frame)
            reply = conn.read_header()
            assert reply["ok"] is False and reply["code"] == code, (stage, reply)
            assert conn.closed_by_server()
        finally:
            conn.close()
    wait_for(lambda: len(handshake_lines(daemon)) == 2, what="one log line per refusal")
    log = daemon.log_text()
    assert "internal" not in log and "Traceback" not in log, log
    with Client("127.0.0.1", daemon.port, timeout=10, token=TOKEN.encode()) as client:
        assert client.ls("") == []


def handshake_lines(daemon) -> list[str]:
    return [line for line in daemon.log_text().splitlines()
            if " handshake " in line or "authentication failed" in line]


@pytest.mark.parametrize("payload", [
    '{"op":"ls","path":"","x":' + deep(5000) + "}",
    '{"op":"ls","path":"","x":' + deep(MAX_JSON_DEPTH + 1) + "}",
    '{"op":"ls","path":"","x":' + '{"a":' * 3000 + "1" + "}" * 3000 + "}",
    '{"op":"ls","path":"","x":NaN}',
    '{"op":"ls","path":"","x":Infinity}',
    '{"op":"ls","path":"","x":[-Infinity]}',
], ids=["deep", "just-too-deep", "deep-objects", "nan", "infinity", "minus-infinity"])
def test_deep_json_and_non_numbers_are_bad_requests_after_authentication(daemon, payload):
    conn = RawConnection(daemon.port)
    try:
        conn.send(struct.pack(">I", len(payload)) + payload.encode())
        reply = conn.read_header()
        assert reply["ok"] is False and reply["code"] == "bad_request", reply
    finally:
        conn.close()
    with Client("127.0.0.1", daemon.port, timeout=10) as client:
        assert client.ls("") == []
    log = daemon.log_text()
    assert "internal" not in log and "Traceback" not in log, log


def test_json_nesting_is_bounded_but_brackets_in_strings_are_only_text():
    ok = '{"op":"ls","path":"' + "[" * 5000 + '","x":' + deep(MAX_JSON_DEPTH - 1) + "}"
    assert decode_header(ok.encode())["path"] == "[" * 5000
    escaped_quote = '{"a":"\\"' + "[" * 100 + '"}'  # a string holding \" then brackets
    assert decode_header(escaped_quote.encode())["a"].endswith("[" * 100)
    with pytest.raises(BadRequest):
        decode_header(('{"x":' + deep(MAX_JSON_DEPTH) + "}").encode())
    for word in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(BadRequest):
            decode_header(f'{{"x":{word}}}'.encode())
    with pytest.raises(BadRequest):  # and never sent either
        encode_frame({"op": "x", "v": float("nan")})


# ------------------------------------------------------------------ the log

LINE_START = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")


def test_a_request_can_never_forge_a_log_line(daemon):
    forged = "2099-01-01T00:00:00 10.0.0.1:1 put 'x' bytes=1 0.001s ok"
    conn = RawConnection(daemon.port, handshake=False)
    try:
        conn.read_header()
        hello = conn.request(Hello(agent="agent\n" + forged).header())
        assert hello["ok"] is True
        for header in ({"op": "x\n" + forged, "path": ""},
                       {"op": "ls", "path": "a\r\n" + forged},
                       {"op": "stat", "path": "b\u2028" + forged},
                       {"op": "mv", "src": "\x1b[2K\r" + forged, "dst": "c\x85d"}):
            assert conn.request(header)["ok"] is False
    finally:
        conn.close()
    wait_for(lambda: daemon.log_text().count(" mv ") == 1, what="the last request's line")
    lines = daemon.log_text().splitlines()
    assert all(LINE_START.match(line) for line in lines), lines
    assert not any(line.startswith("2099") for line in lines)
    text = daemon.log_text()
    assert "\u2028" not in text and "\x1b" not in text and "\x85" not in text and "\r" not in text


def test_the_log_function_escapes_and_never_raises(monkeypatch):
    from filesrv import daemonlog as server  # the daemon's log
    read_end, write_end = os.pipe()
    try:
        monkeypatch.setattr(server, "_LOG_FD", write_end)
        server.log("one\ntwo\r\x1b[31m\u2028\ud800 end")
        os.close(write_end)
        written = os.read(read_end, 65536).decode()
        assert written.count("\n") == 1 and written.endswith(" one\\ntwo\\r\\x1b[31m\\u2028\\ud800 end\n")
        for _ in range(3):  # no reader and no writer: EPIPE, then EBADF
            server.log("lost")
        os.close(read_end)
        server.log("lost too")
        again_read, again_write = os.pipe()
        monkeypatch.setattr(server, "_LOG_FD", again_write)
        server.log("back")
        os.close(again_write)
        back = os.read(again_read, 65536).decode().splitlines()
        os.close(again_read)
        assert "4 earlier log line(s) could not be written" in back[0] and back[1].endswith(" back")
    finally:
        for fd in (read_end, write_end):
            try:
                os.close(fd)
            except OSError:
                pass


# ------------------------------------------------------------------ every field, every type

WRONG_VALUES = [None, True, -1, 1.5, "7", [], {}, 2**64, "\x00"]


def is_wrong(key: str, value, original) -> bool:
    if key == "if_match":  # optional: null or any string is valid
        return not (value is None or isinstance(value, str))
    if key in ("recursive", "parents", "chunked"):  # optional flags: null means false
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
