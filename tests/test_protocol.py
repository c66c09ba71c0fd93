"""Unit tests of the sans-IO protocol core: framing, validation, paths, digests."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from filesrv.errors import (BadPath, BadRequest, Busy, FilesrvError, IntegrityError, NotFound,
                            error_from_code)
from filesrv.protocol import (MAX_HEADER_SIZE, PREFIX_SIZE, Commit, Data, FrameBuffer, Get,
                              Hello, ListDir, Put, check_reply, decode_header, decode_listing,
                              encode_frame, encode_listing, Entry, error_reply, normalize_path,
                              ok_reply, parse_get_reply, parse_length_prefix, parse_path,
                              parse_request)

json_scalars = st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=20)
headers = st.dictionaries(st.text(max_size=20), json_values, max_size=8)


def frames_from(stream: bytes, cuts: list[int]) -> list[dict]:
    buf = FrameBuffer()
    out = []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    for piece in pieces:
        buf.feed(piece)
        while (header := buf.next_header()) is not None:
            out.append(header)
    return out


@given(st.lists(headers, max_size=5), st.data())
@settings(max_examples=200, deadline=None)
def test_frames_round_trip_whatever_the_chunking(messages, data):
    stream = b"".join(encode_frame(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    assert frames_from(stream, cuts) == messages


@given(headers)
def test_frame_is_big_endian_length_then_utf8_json(message):
    frame = encode_frame(message)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert decode_header(frame[4:]) == message


def test_body_bytes_after_a_header_are_left_for_the_body():
    buf = FrameBuffer()
    buf.feed(encode_frame({"op": "data", "length": 5}) + b"hello" + encode_frame({"op": "x"}))
    assert buf.next_header() == {"op": "data", "length": 5}
    assert buf.take_body(3) == b"hel"
    assert buf.take_body(10)[:2] == b"lo"


def test_oversized_length_prefix_is_refused_before_the_payload_arrives():
    buf = FrameBuffer()
    buf.feed(struct.pack(">I", MAX_HEADER_SIZE + 1))  # and nothing else
    with pytest.raises(BadRequest, match="exceeds"):
        buf.next_header()
    with pytest.raises(BadRequest):
        parse_length_prefix(b"\xff\xff\xff\xff")
    assert parse_length_prefix(struct.pack(">I", MAX_HEADER_SIZE)) == MAX_HEADER_SIZE


def test_encoding_an_oversized_header_is_refused():
    with pytest.raises(BadRequest):
        encode_frame({"x": "a" * MAX_HEADER_SIZE})


def test_incomplete_frame_waits_for_more_bytes():
    frame = encode_frame({"op": "ls", "path": ""})
    buf = FrameBuffer()
    buf.feed(frame[:-1])
    assert buf.next_header() is None
    buf.feed(frame[-1:])
    assert buf.next_header() == {"op": "ls", "path": ""}


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"not json", b"[1, 2]", b"3", b'"s"', b""])
def test_payload_that_is_not_a_json_object_is_refused(payload):
    with pytest.raises(BadRequest):
        decode_header(payload)


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_random_bytes_either_decode_to_objects_or_raise_bad_request(blob):
    buf = FrameBuffer()
    buf.feed(blob)
    try:
        while (header := buf.next_header()) is not None:
            assert isinstance(header, dict)
    except BadRequest:
        pass


# ------------------------------------------------------------------ requests

@pytest.mark.parametrize("request_", [
    Hello(), ListDir(path="a/b"), Get(path="x", offset=5, if_match="e"), Get(path="x"),
    Put(path="a/b.bin", size=10, source="s"), Data(length=0), Commit(xxh128="0" * 32),
])
def test_every_request_round_trips_through_its_frame(request_):
    frame = request_.frame()
    assert parse_request(decode_header(frame[PREFIX_SIZE:])) == request_


@pytest.mark.parametrize("header", [
    {},
    {"op": 1},
    {"op": "nope"},
    {"op": "get"},
    {"op": "get", "path": "a", "offset": -1},
    {"op": "get", "path": "a", "offset": True},
    {"op": "get", "path": "a", "offset": 1.5},
    {"op": "get", "path": "a", "offset": "1"},
    {"op": "get", "path": "a", "offset": 2**63},
    {"op": "get", "path": ["a"], "offset": 0},
    {"op": "get", "path": "a", "offset": 0, "if_match": 5},
    {"op": "put", "path": "a", "size": -5, "source": "s"},
    {"op": "put", "path": "a", "size": 5},
    {"op": "put", "path": "a", "size": 5, "source": "s" * 1000},
    {"op": "data", "length": None},
    {"op": "commit", "xxh128": "XYZ"},
    {"op": "commit", "xxh128": "A" * 32},
    {"op": "hello", "version": "1"},
])
def test_malformed_requests_are_refused_as_bad_request(header):
    with pytest.raises(BadRequest):
        parse_request(header)


@pytest.mark.parametrize("path", ["../x", "a/../../x", "a\x00b", "a//b", "./a", "a/.",
                                  ".filesrv/partials/x", "/.filesrv", "x" * 256, "a/"])
def test_unsafe_or_ambiguous_paths_are_refused_as_bad_path(path):
    with pytest.raises(BadPath):
        parse_path(path)


def test_path_rules_for_the_root_and_leading_slash():
    assert parse_path("/a/b.bin") == ("a", "b.bin")
    assert parse_path("a/b.bin") == ("a", "b.bin")
    assert parse_path("", allow_root=True) == ()
    assert parse_path("/", allow_root=True) == ()
    assert parse_path("dir/", allow_root=True) == ("dir",)
    assert parse_path("ünï cødé/文件 1.bin") == ("ünï cødé", "文件 1.bin")
    assert parse_path("x" * 255) == ("x" * 255,)
    assert normalize_path("/a/b") == "a/b"
    with pytest.raises(BadPath):
        parse_path("/")


def test_get_request_with_a_bad_path_is_refused_by_validation():
    with pytest.raises(BadPath):
        parse_request({"op": "get", "path": "../etc/passwd", "offset": 0})


# ------------------------------------------------------------------ replies and errors

def test_error_reply_raises_the_matching_error_type_with_its_message():
    with pytest.raises(NotFound, match="no such file"):
        check_reply(error_reply(NotFound("no such file: 'x'")))
    with pytest.raises(Busy):
        check_reply({"ok": False, "code": "busy", "message": "full"})


def test_unknown_error_codes_stay_errors_with_their_code():
    err = error_from_code("martian", "beep")
    assert isinstance(err, FilesrvError) and err.code == "martian" and "beep" in err.message


def test_error_codes_and_exit_statuses_are_stable():
    assert (NotFound.code, BadPath.code, BadRequest.code, Busy.code, IntegrityError.code) == \
        ("not_found", "bad_path", "bad_request", "busy", "integrity")
    assert IntegrityError.exit_status == 6 and Busy.exit_status == 8


def test_get_reply_must_add_up():
    good = ok_reply(size=10, offset=4, length=6, etag="e", xxh128="a" * 32)
    assert parse_get_reply(good).length == 6
    with pytest.raises(BadRequest):
        parse_get_reply({**good, "length": 7})


def test_listing_round_trips_and_rejects_bad_entries():
    entries = [Entry("a", "file", 3, 1.5), Entry("d", "dir", 0, 2.0)]
    assert decode_listing(encode_listing(entries)) == entries
    with pytest.raises(BadRequest):
        decode_listing(b'[{"name": "a", "type": "fifo", "size": 0, "mtime": 0}]')
    with pytest.raises(BadRequest):
        decode_listing(b'{"a": 1}')


# ------------------------------------------------------------------ digest

DIGEST_VECTORS = [  # as xxh128sum prints them
    (b"", "99aa06d3014798d86001c324468d497f"),
    (b"abc", "06b05ab6733a618578af5f94892f3950"),
    (bytes(range(256)) * 4096, "1b208d2839093774d36c0e13a3df139e"),
]


@pytest.mark.parametrize("buffer_size", [1, 7, 4096, 1 << 20])
@pytest.mark.parametrize("data,expected", DIGEST_VECTORS)
def test_hash_fd_range_of_a_whole_file_matches_xxh128sum(tmp_path, data, expected,
                                                         buffer_size):
    from filesrv.hashing import hash_fd_range
    path = tmp_path / "v.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        hasher = xxhash.xxh3_128()
        hash_fd_range(fd, 0, len(data), hasher, bytearray(buffer_size))
    finally:
        os.close(fd)
    assert hasher.hexdigest() == expected


def test_hash_fd_range_feeds_exactly_its_range_and_refuses_a_short_file(tmp_path):
    from filesrv.errors import IoError
    from filesrv.hashing import hash_fd_range
    data = bytes(range(256)) * 64
    path = tmp_path / "r.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        hasher = xxhash.xxh3_128(b"abc")  # a range continues what came before it
        hash_fd_range(fd, 100, 9000, hasher, bytearray(1000))
        assert hasher.hexdigest() == xxhash.xxh3_128(b"abc" + data[100:9000]).hexdigest()
        with pytest.raises(IoError):
            hash_fd_range(fd, 0, len(data) + 1, xxhash.xxh3_128(), bytearray(4096))
    finally:
        os.close(fd)


def test_auth_proof_matches_the_documented_example():
    from filesrv.protocol import auth_proof, proof_matches
    proof = auth_proof(b"s3cret", "00" * 32)
    assert proof == "a7a6d0d9138641cf025a6e3bde015ceb99cb31f1a3932b51ca0cb76bacbf07bf"
    assert proof in (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    assert proof_matches([b"other", b"s3cret"], "00" * 32, proof)
    assert not proof_matches([b"other"], "00" * 32, proof)
    assert not proof_matches([b"s3cret"], "00" * 32, None)


# ---------------------------------------------------------------- batches

def test_put_files_request_is_validated_entry_by_entry():
    from filesrv.protocol import MAX_BATCH_FILES, PutFiles
    ok = {"path": "a/b", "size": 3, "xxh128": "0" * 32}
    assert parse_request(PutFiles([ok]).header()) == PutFiles([ok])
    bad_entries = [{**ok, "path": "../x"}, {**ok, "size": -1}, {**ok, "xxh128": "XY"},
                   {k: v for k, v in ok.items() if k != "size"}, "a/b"]
    for entry in bad_entries:
        with pytest.raises((BadRequest, BadPath)):
            parse_request({"op": "put_files", "skip": "identical", "files": [entry]})
    for files in ([], [ok] * (MAX_BATCH_FILES + 1)):
        with pytest.raises(BadRequest):
            parse_request({"op": "put_files", "skip": "identical", "files": files})
    with pytest.raises(BadRequest):
        parse_request({"op": "put_files", "skip": "sometimes", "files": [ok]})


def test_get_files_entries_may_carry_the_digest_the_client_has():
    from filesrv.protocol import GetFiles
    request = parse_request({"op": "get_files", "files": [{"path": "a"},
                                                          {"path": "b", "xxh128": "1" * 32}]})
    assert request == GetFiles([{"path": "a", "xxh128": None}, {"path": "b", "xxh128": "1" * 32}])
    # a path §4 refuses is refused by the server in that entry's frame, not here
    assert parse_request({"op": "get_files", "files": [{"path": ""}]}).files[0]["path"] == ""
    with pytest.raises(BadRequest):
        parse_request({"op": "get_files", "files": [{"path": None}]})


def test_batch_replies_are_checked_against_the_request():
    from filesrv.protocol import parse_file_reply, parse_need_reply, parse_placed_reply
    assert parse_need_reply({"ok": True, "need": [0, 2]}, 3) == [0, 2]
    for need in ([2, 0], [0, 0], [3], [-1], [True]):
        with pytest.raises(BadRequest):
            parse_need_reply({"ok": True, "need": need}, 3)
    failed = parse_placed_reply({"ok": True, "failed": [
        {"index": 1, "code": "integrity", "message": "m"}]}, 2)
    assert list(failed) == [1] and failed[1].code == "integrity"
    with pytest.raises(BadRequest):
        parse_placed_reply({"ok": True, "failed": [{"index": 2, "code": "io_error",
                                                    "message": "m"}]}, 2)
    assert parse_file_reply({"ok": True, "size": 5, "xxh128": "0" * 32, "length": 0}).length == 0
    with pytest.raises(BadRequest):
        parse_file_reply({"ok": True, "size": 5, "xxh128": "0" * 32, "length": 3})


# ---------------------------------------------------------------- chunked replies

def read_chunks(stream: bytes) -> tuple[list, list[int]]:
    """Items and body sizes of a chunked reply, decoded as a client does."""
    from filesrv.protocol import decode_chunk, parse_chunk
    buf = FrameBuffer()
    buf.feed(stream)
    items, lengths = [], []
    while True:
        chunk = parse_chunk(buf.next_header())
        items += decode_chunk(buf.take_body(chunk.length), chunk.count)
        lengths.append(chunk.length)
        if not chunk.more:
            assert buf.buffered == 0
            return items, lengths


@pytest.mark.parametrize("count", [0, 1, 5000])
def test_chunked_replies_carry_every_item_in_small_bodies(count):
    from filesrv.protocol import CHUNK_BYTES, encode_chunks
    items = [{"name": f"dir/entry-{i:05d}", "size": i} for i in range(count)]
    widest = max((len(json.dumps(i, separators=(",", ":"))) for i in items), default=0)
    decoded, lengths = read_chunks(b"".join(encode_chunks(iter(items))))
    assert decoded == items
    assert all(n <= CHUNK_BYTES + widest + 2 for n in lengths)
    assert len(lengths) == max(1, -(-sum(lengths) // (CHUNK_BYTES + widest + 2)))


def test_a_reply_without_more_is_one_last_chunk():
    """What a server that does not chunk sends (the ls reply of protocol 1.0)."""
    from filesrv.protocol import Chunk, parse_chunk
    assert parse_chunk({"ok": True, "length": 2, "count": 0}) == Chunk(2, 0, False)
    with pytest.raises(NotFound):
        parse_chunk({"ok": False, "code": "not_found", "message": "gone"})


def test_a_chunk_body_must_hold_the_count_it_announced():
    from filesrv.protocol import decode_chunk
    assert decode_chunk(b'[1,2]', 2) == [1, 2]
    for body, count in ((b'[1,2]', 3), (b'{"a":1}', 1), (b'[1,', 1), (b'\xff', 0)):
        with pytest.raises(BadRequest):
            decode_chunk(body, count)


def test_put_files_failures_always_fit_the_header_of_a_client_that_does_not_chunk():
    from filesrv.protocol import MAX_BATCH_FILES, placed_reply
    failures = [{"index": i, "code": "not_a_directory", "message": "\x01" * 4096}
                for i in range(MAX_BATCH_FILES)]
    reply = placed_reply(failures)
    assert len(encode_frame(reply)) <= MAX_HEADER_SIZE + PREFIX_SIZE
    assert [(f["index"], f["code"]) for f in reply["failed"]] == \
        [(f["index"], f["code"]) for f in failures]
    few = [{"index": 1, "code": "integrity", "message": "x" * 4096}] * 3
    assert placed_reply(few)["failed"] == few  # whole when they fit
