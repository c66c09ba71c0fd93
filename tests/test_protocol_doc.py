"""docs/PROTOCOL.md's worked example, replayed byte for byte against a live daemon."""

from __future__ import annotations

import json
import re
import struct

from conftest import REPO, RawConnection

LINE = re.compile(r"^(→|←) \[(\d+|n)\] (\{.*?\})(?: \+ (.*))?$")
ANY = "__any__"


def example_lines() -> list[tuple[str, str, str, str | None]]:
    doc = (REPO / "docs" / "PROTOCOL.md").read_text()
    block = doc.split("## 8. Worked example", 1)[1].split("```")[1]
    lines = [LINE.match(line) for line in block.strip().splitlines()]
    assert all(lines), "every line of the example must parse"
    return [m.groups() for m in lines]  # type: ignore[union-attr]


def loads_with_placeholders(text: str) -> object:
    return json.loads(re.sub(r"\b(ETAG|MTIME|L)\b", f'"{ANY}"', text))


def matches(expected: object, actual: object) -> bool:
    if expected == ANY:
        return True
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(
            matches(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(map(matches, expected, actual))
    return expected == actual


def test_worked_example_is_exactly_what_the_daemon_does(daemon):
    lines = example_lines()
    assert len(lines) >= 10
    conn = RawConnection(daemon.port, handshake=False)
    try:
        for direction, length, header, body in lines:
            if direction == "→":
                payload = header.encode()
                assert int(length) == len(payload), f"wrong length in the doc: {header}"
                conn.send(struct.pack(">I", len(payload)) + payload
                          + (body.encode() if body else b""))
                continue
            reply = conn.read_header()
            assert matches(loads_with_placeholders(header), reply), (header, reply)
            if length != "n":
                assert int(length) == len(json.dumps(reply, separators=(",", ":")).encode())
            if body is not None:
                received = conn.read_body(reply["length"])
                if body.startswith("["):
                    assert matches(loads_with_placeholders(body), json.loads(received))
                else:
                    assert received == body.encode()
    finally:
        conn.close()


# ------------------------------------------------------------------ each point of the spec
# that an implementation written from docs/PROTOCOL.md alone found unclear or untrue

import signal  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402
import xxhash  # noqa: E402

from conftest import upload_partial_over, wait_for  # noqa: E402
from filesrv.protocol import Data, PutFiles, encode_frame  # noqa: E402

DOC = (REPO / "docs" / "PROTOCOL.md").read_text()


def one_file(path: str, body: bytes = b"x") -> dict:
    return {"path": path, "size": len(body), "xxh128": xxhash.xxh3_128_hexdigest(body)}


@pytest.mark.parametrize("path", ["", "/"])
def test_the_root_named_where_a_file_is_expected_is_bad_path(daemon, path):
    """§3/§4: the root as the path of get, put or a put_files entry is bad_path."""
    assert "`bad_path`, not `is_a_directory`" in DOC
    conn = RawConnection(daemon.port)
    try:
        assert conn.request({"op": "get", "path": path, "offset": 0})["code"] == "bad_path"
        assert conn.request({"op": "put", "path": path, "size": 1, "source": "s"}
                            )["code"] == "bad_path"
        assert conn.request(PutFiles([one_file(path)]).header())["code"] == "bad_path"
        assert conn.request({"op": "stat", "path": path})["type"] == "dir"  # still in step
    finally:
        conn.close()


def test_a_trailing_slash_names_a_directory_or_is_refused(daemon):
    """§4: `x/` may name only a directory; on a file it is not_a_directory, never the file."""
    (daemon.root / "f").write_bytes(b"file")
    (daemon.root / "d").mkdir()
    (daemon.root / "d" / "inside").write_bytes(b"in")
    conn = RawConnection(daemon.port)
    try:
        assert conn.request({"op": "stat", "path": "f/"})["code"] == "not_a_directory"
        assert conn.request({"op": "rm", "path": "f/"})["code"] == "not_a_directory"
        assert conn.request({"op": "mv", "src": "f", "dst": "g/"})["code"] == "not_a_directory"
        assert conn.request({"op": "mv", "src": "f/", "dst": "g"})["code"] == "not_a_directory"
        assert (daemon.root / "f").read_bytes() == b"file" and not (daemon.root / "g").exists()
        assert conn.request({"op": "get", "path": "f/", "offset": 0})["code"] == "bad_path"
        assert conn.request({"op": "put", "path": "f/", "size": 1, "source": "s"}
                            )["code"] == "bad_path"
        # on a directory, "d/" is "d"
        assert conn.request({"op": "stat", "path": "d/"})["type"] == "dir"
        assert conn.request({"op": "mkdir", "path": "e/"})["ok"] is True
        assert conn.request({"op": "mv", "src": "d/", "dst": "e/d2/"})["ok"] is True
        assert (daemon.root / "e" / "d2" / "inside").read_bytes() == b"in"
        assert conn.request({"op": "rm", "path": "e/", "recursive": True})["removed"] == 3
    finally:
        conn.close()


def test_put_files_sends_data_even_when_nothing_is_needed(daemon):
    """§5.8: after `need: []` the client still sends `data` of length 0; anything else in
    its place is out of step: bad_request, and the connection closes."""
    (daemon.root / "same.txt").write_bytes(b"x")
    conn = RawConnection(daemon.port)
    assert conn.request(PutFiles([one_file("same.txt")]).header())["need"] == []
    conn.send(Data(length=0).frame())
    assert conn.read_header() == {"ok": True, "failed": []}
    assert conn.request(PutFiles([one_file("same.txt")]).header())["need"] == []
    assert conn.request({"op": "stat", "path": "same.txt"})["code"] == "bad_request"
    assert conn.closed_by_server()
    conn.close()


def test_get_files_refuses_a_bad_path_in_its_own_frame(daemon):
    """§5.9: a path §4 refuses fails its entry alone; the others are served."""
    (daemon.root / "ok.txt").write_bytes(b"fine")
    conn = RawConnection(daemon.port)
    try:
        conn.send(encode_frame({"op": "get_files", "files": [
            {"path": "../outside"}, {"path": ""}, {"path": "a//b"}, {"path": "ok.txt"}]}))
        assert conn.read_header() == {"ok": True, "count": 4}
        assert [conn.read_header()["code"] for _ in range(3)] == ["bad_path"] * 3
        last = conn.read_header()
        assert last["ok"] is True and conn.read_body(last["length"]) == b"fine"
        refused = conn.request({"op": "get_files", "files": [{"path": 7}]})
        assert refused["code"] == "bad_request"  # a wrong type still refuses the request
    finally:
        conn.close()


def test_a_malformed_auth_proof_is_bad_request_and_closes(daemon_factory, tmp_path):
    """§2.3: an auth whose proof is not 64 lowercase hex digits is malformed, not a guess."""
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    daemon = daemon_factory("--token-file", str(tokens))
    for proof in ("not-hex", "A" * 64, 42):
        conn = RawConnection(daemon.port, handshake=False)
        try:
            assert conn.read_header()["auth"]["method"] == "hmac-sha256"
            conn.send(encode_frame({"op": "hello", "version": 1}))
            assert conn.read_header()["ok"] is True
            assert conn.request({"op": "auth", "proof": proof})["code"] == "bad_request"
            assert conn.closed_by_server()
        finally:
            conn.close()


def test_not_a_directory_after_commit_leaves_the_connection_usable(daemon):
    """§5.3: a file that took a parent's name during the upload fails the commit."""
    conn = RawConnection(daemon.port)
    try:
        assert conn.request({"op": "put", "path": "a/b.txt", "size": 3, "source": "s"}
                            ) == {"ok": True, "offset": 0}
        (daemon.root / "a").write_bytes(b"now a file")
        conn.send(Data(length=3).frame() + b"abc")
        reply = conn.request({"op": "commit", "xxh128": xxhash.xxh3_128_hexdigest(b"abc")})
        assert reply["code"] == "not_a_directory"
        after_commit = " ".join(DOC.split()).split("Errors after `commit` (")[1].split(")")[0]
        assert "`not_a_directory`" in after_commit
        assert conn.request({"op": "stat", "path": "a"})["size"] == 10  # still usable
    finally:
        conn.close()


def test_the_documented_order_of_a_recursive_listing_is_the_daemons(daemon):
    """§5.1 shows an example order; the daemon lists exactly that."""
    example = "`a`, `a-b`, `a.txt`, `a/x`, `a0`, `b`"
    assert example in DOC
    (daemon.root / "t" / "a").mkdir(parents=True)
    for name in ("a/x", "a-b", "a.txt", "a0", "b"):
        (daemon.root / "t" / name).write_bytes(b"")
    conn = RawConnection(daemon.port)
    try:
        reply = conn.request({"op": "ls", "path": "t", "recursive": True})
        names = [e["name"] for e in json.loads(conn.read_body(reply["length"]))]
    finally:
        conn.close()
    assert names == [n.strip("`") for n in example.split(", ")]


def test_a_put_cut_by_the_grace_period_gets_no_reply_and_resumes(daemon_factory):
    """§2.7: past the grace period a put in flight is cut: the connection closes without
    a reply; its partial stays, and the same put resumes on the restarted server."""
    daemon = daemon_factory("--grace", "0.2")
    size = 8 * 1024 * 1024
    conn = RawConnection(daemon.port)
    put = {"op": "put", "path": "big.bin", "size": size, "source": "v1"}
    assert conn.request(put) == {"ok": True, "offset": 0}
    conn.send(Data(length=size).frame() + b"\0" * (1024 * 1024))
    wait_for(upload_partial_over(daemon, 1024 * 1024 - 1), what="the first MiB to land")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0
    try:
        assert conn.sock.recv(65536) == b""  # no frame: the connection just ends
    except ConnectionResetError:
        pass
    finally:
        conn.close()
    again = daemon_factory(root=daemon.root)
    conn = RawConnection(again.port)
    try:
        assert conn.request(put) == {"ok": True, "offset": 1024 * 1024}
    finally:
        conn.close()


def test_put_files_holds_fewer_than_1024_entries_in_64_kib(daemon):
    """§5.8: the header limit binds before the 1,024-entry limit; the doc says by how much."""
    smallest = len(json.dumps(one_file("a", b""), separators=(",", ":"))) + 1  # and a comma
    assert f"at least {smallest} bytes" in DOC
    assert 1024 * smallest > 65536
    conn = RawConnection(daemon.port)
    try:
        files = [one_file(f"{i:x}", b"") for i in range(1024)]
        frame = json.dumps({"op": "put_files", "skip": "identical", "files": files},
                           separators=(",", ":")).encode()
        assert len(frame) > 65536
        conn.send(struct.pack(">I", len(frame)) + frame)
        assert conn.read_header()["code"] == "bad_request"
        assert conn.closed_by_server()
    finally:
        conn.close()
    conn = RawConnection(daemon.port)
    try:
        fits = conn.request(PutFiles([one_file(f"{i:x}", b"") for i in range(900)]).header())
        assert fits["need"] == list(range(900))
    finally:
        conn.close()
