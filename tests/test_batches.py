"""Many small files to an exchange (put_files / get_files), as trees use them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import xxhash

from conftest import (RawConnection, cli, kill_when, random_file, start_cli, upload_partial_over,
                      wait_for, xxh128_of)
from filesrv.client import Client
from filesrv.protocol import Data, GetFiles, PutFiles, encode_frame


def small_tree(root: Path, count: int, size: int = 3000) -> dict[str, str]:
    for i in range(count):
        random_file(root / f"d{i % 5}" / f"f{i:03d}.bin", size + i)
    return {str(p.relative_to(root)): xxh128_of(p) for p in root.rglob("*") if p.is_file()}


def digests_under(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): xxh128_of(p) for p in root.rglob("*")
            if p.is_file() and ".filesrv" not in p.parts}


def logged_ops(daemon) -> list[str]:
    return [line.split()[2] for line in daemon.log_text().splitlines()
            if len(line.split()) > 3 and line.split()[2].isidentifier()]


def test_small_files_of_a_tree_travel_many_to_an_exchange(daemon, tmp_path):
    expected = small_tree(tmp_path / "src", 300)
    random_file(tmp_path / "src" / "big.bin", 3 * 1024 * 1024)  # over the batch limit
    expected["big.bin"] = xxh128_of(tmp_path / "src" / "big.bin")
    cli("put", "-s", daemon.address, "-r", str(tmp_path / "src"), "t")
    cli("get", "-s", daemon.address, "-r", "t", str(tmp_path / "copy"))
    assert digests_under(daemon.root / "t") == expected == digests_under(tmp_path / "copy")
    ops = logged_ops(daemon)
    assert ops.count("put") == 1 and ops.count("get") == 1  # only the big file alone
    assert 1 <= ops.count("put_files") <= 2 and 1 <= ops.count("get_files") <= 2


def test_get_r_lists_the_remote_tree_once(daemon, tmp_path):
    small_tree(daemon.root / "t", 40)
    cli("get", "-s", daemon.address, "-r", "t", str(tmp_path / "copy"))
    assert digests_under(tmp_path / "copy") == digests_under(daemon.root / "t")
    assert logged_ops(daemon).count("ls") == 1  # the progress bar's totals come from it too


def test_a_tree_download_stopped_early_leaves_the_client_in_step(daemon, tmp_path):
    """A batch requested ahead must not be taken for the answer to the next command."""
    for i in range(20):  # two batches
        random_file(daemon.root / "t" / f"f{i:02d}.bin", 600 * 1024)
    random_file(daemon.root / "other.bin", 100)

    def stop(result: Any) -> None:
        raise KeyboardInterrupt

    with Client("127.0.0.1", daemon.port) as client:
        try:
            client.get_tree("t", str(tmp_path / "copy"), on_file=stop)
            raise AssertionError("on_file's interruption did not stop the download")
        except KeyboardInterrupt:
            pass
        assert client.stat("other.bin").size == 100
        assert [e.name for e in client.ls("t")][:2] == ["f00.bin", "f01.bin"]


def test_put_files_places_the_good_files_and_refuses_a_wrong_digest(daemon):
    good, bad = b"good bytes", b"bad bytes"
    conn = RawConnection(daemon.port)
    reply = conn.request(PutFiles([
        {"path": "b/good.txt", "size": len(good), "xxh128": xxhash.xxh3_128_hexdigest(good)},
        {"path": "b/bad.txt", "size": len(bad), "xxh128": "0" * 32}]).header())
    assert reply == {"ok": True, "need": [0, 1]}
    conn.send(Data(length=len(good) + len(bad)).frame() + good + bad)
    placed = conn.read_header()
    assert placed["ok"] is True
    assert [(f["index"], f["code"]) for f in placed["failed"]] == [(1, "integrity")]
    assert (daemon.root / "b" / "good.txt").read_bytes() == good
    assert not (daemon.root / "b" / "bad.txt").exists()
    assert list((daemon.root / ".filesrv" / "partials").iterdir()) == []
    # the connection is still in step: the same file again is not needed
    assert offer_one_file(conn, "b/good.txt", good) == []
    conn.send(Data(length=0).frame())
    assert conn.read_header() == {"ok": True, "failed": []}
    conn.close()


def offer_one_file(conn: RawConnection, path: str, body: bytes) -> list[int]:
    """A put_files request for one file; the indices the server needs."""
    return conn.request(PutFiles([{"path": path, "size": len(body),
                                   "xxh128": xxhash.xxh3_128_hexdigest(body)}]).header()
                        )["need"]


def test_put_files_with_a_wrong_data_length_is_refused_and_nothing_is_placed(daemon):
    conn = RawConnection(daemon.port)
    body = b"x" * 100
    assert offer_one_file(conn, "w.bin", body) == [0]
    conn.send(Data(length=99).frame() + body[:99])
    assert conn.read_header()["code"] == "bad_request"
    assert conn.closed_by_server()
    assert not (daemon.root / "w.bin").exists()
    assert RawConnection(daemon.port).request({"op": "ls", "path": ""})["ok"] is True


def test_put_files_refuses_names_outside_the_root_before_any_byte(daemon):
    conn = RawConnection(daemon.port)
    reply = conn.request({"op": "put_files", "skip": "identical",
                          "files": [{"path": "../escape", "size": 1, "xxh128": "0" * 32}]})
    assert reply["ok"] is False and reply["code"] == "bad_path"
    assert conn.request({"op": "ls", "path": ""})["ok"] is True  # still in step


def test_get_files_answers_each_file_in_its_own_frame(daemon):
    data = random_file(daemon.root / "g" / "one.bin", 5000).read_bytes()
    (daemon.root / "g" / "dir").mkdir()
    digest = xxhash.xxh3_128_hexdigest(data)
    conn = RawConnection(daemon.port)
    conn.send(GetFiles([{"path": "g/one.bin", "xxh128": None},
                        {"path": "g/missing", "xxh128": None},
                        {"path": "g/dir", "xxh128": None},
                        {"path": "g/one.bin", "xxh128": digest}]).frame())
    assert conn.read_header() == {"ok": True, "count": 4}
    first = conn.read_header()
    assert (first["size"], first["length"], first["xxh128"]) == (5000, 5000, digest)
    assert conn.read_body(5000) == data
    assert conn.read_header()["code"] == "not_found"
    assert conn.read_header()["code"] == "is_a_directory"
    unchanged = conn.read_header()
    assert (unchanged["length"], unchanged["xxh128"]) == (0, digest)  # the copy is current
    assert conn.request({"op": "ls", "path": ""})["ok"] is True


def test_read_only_daemon_refuses_a_tree_upload(daemon_factory, tmp_path):
    daemon = daemon_factory("--read-only")
    small_tree(tmp_path / "src", 3)
    put = cli("put", "-s", daemon.address, "-r", str(tmp_path / "src"), "t", check=False)
    assert put.returncode == 5 and "read-only" in put.stderr
    assert not (daemon.root / "t").exists()


def test_killed_tree_upload_leaves_only_whole_files_and_a_rerun_finishes(daemon, tmp_path):
    expected = small_tree(tmp_path / "src", 600, size=20_000)  # ~12 MiB: two batches
    proc = start_cli("put", "-s", daemon.address, "-r", "--limit-rate", "6M",
                     str(tmp_path / "src"), "t")
    kill_when(proc, lambda: "put_files" in daemon.log_text(), "the first batch to land")
    landed = digests_under(daemon.root / "t")
    assert 0 < len(landed) < len(expected)
    assert all(expected[rel] == digest for rel, digest in landed.items())  # none torn
    wait_for(lambda: not list((daemon.root / ".filesrv" / "partials").iterdir()),
             what="the cut batch's temporaries to be removed")
    rerun = [json.loads(line) for line in
             cli("put", "-s", daemon.address, "-r", "--json", str(tmp_path / "src"),
                 "t").stdout.splitlines()]
    assert sum(bool(r.get("skipped")) for r in rerun) == len(landed)
    assert digests_under(daemon.root / "t") == expected


def test_tree_upload_over_a_symlink_inside_the_root_writes_its_target(daemon, tmp_path):
    (daemon.root / "t").mkdir()
    (daemon.root / "t" / "real.bin").write_bytes(b"old")
    (daemon.root / "t" / "link.bin").symlink_to("real.bin")
    src = tmp_path / "src"
    new = random_file(src / "link.bin", 4000).read_bytes()
    random_file(src / "other.bin", 10)
    cli("put", "-s", daemon.address, "-r", str(src), "t")
    assert (daemon.root / "t" / "link.bin").is_symlink()
    assert (daemon.root / "t" / "real.bin").read_bytes() == new


def test_tree_progress_adds_up_to_the_tree_size_through_the_api(daemon, tmp_path):
    from filesrv.client import Client
    expected = small_tree(tmp_path / "src", 50)
    random_file(tmp_path / "src" / "big.bin", 2 * 1024 * 1024 + 1)
    total_size = sum(p.stat().st_size for p in (tmp_path / "src").rglob("*") if p.is_file())

    def tally() -> tuple[list[int], Any, Any]:
        state = [0, 0, 0]  # bytes counted, bytes of the current file, files done

        def progress(done: int, size: int) -> None:
            assert done >= state[1]  # a file's progress never runs backwards
            state[0] += done - state[1]
            state[1] = done

        def on_file(result: Any) -> None:
            if result.skipped:
                state[0] += result.size
            state[1] = 0
            state[2] += 1
        return state, progress, on_file

    with Client("127.0.0.1", daemon.port) as client:
        for direction in ("put", "get", "put again"):
            state, progress, on_file = tally()
            if direction == "get":
                client.get_tree("t", str(tmp_path / "copy"), progress=progress, on_file=on_file)
            else:
                client.put_tree(str(tmp_path / "src"), "t", progress=progress, on_file=on_file)
            assert state[0] == total_size and state[2] == len(expected) + 1, direction
    assert digests_under(tmp_path / "copy") == digests_under(tmp_path / "src")


def test_a_file_that_cannot_be_placed_fails_the_tree_but_not_its_neighbours(daemon, tmp_path):
    (daemon.root / "t").mkdir()
    (daemon.root / "t" / "d0").write_bytes(b"a file where the tree has a directory")
    small_tree(tmp_path / "src", 10)  # d0/ ... d4/
    put = cli("put", "-s", daemon.address, "-r", str(tmp_path / "src"), "t", check=False)
    assert put.returncode == 4 and "t/d0/f000.bin" in put.stderr, put.stderr
    assert (daemon.root / "t" / "d0").read_bytes().startswith(b"a file")
    assert (daemon.root / "t" / "d1" / "f001.bin").stat().st_size == 3001


def test_max_file_size_holds_for_files_in_a_batch(daemon_factory, tmp_path):
    daemon = daemon_factory("--max-file-size", "2000")
    random_file(tmp_path / "src" / "small.bin", 1000)
    random_file(tmp_path / "src" / "large.bin", 3000)
    put = cli("put", "-s", daemon.address, "-r", str(tmp_path / "src"), "t", check=False)
    assert put.returncode == 5 and "exceeds" in put.stderr, put.stderr
    assert not (daemon.root / "t" / "large.bin").exists()
    assert (daemon.root / "t" / "small.bin").stat().st_size == 1000


def test_put_files_followed_by_something_other_than_data_closes_cleanly(daemon):
    conn = RawConnection(daemon.port)
    body = b"y" * 10
    assert offer_one_file(conn, "n.bin", body) == [0]
    conn.send(encode_frame({"op": "commit", "xxh128": "0" * 32}) + body)
    assert conn.read_header()["code"] == "bad_request"
    assert conn.closed_by_server()
    assert not (daemon.root / "n.bin").exists()
    assert "internal" not in daemon.log_text()


def test_tree_summary_reports_the_wall_time_not_the_sum_of_batches(daemon, tmp_path):
    import time
    small_tree(tmp_path / "src", 60)
    started = time.monotonic()
    out = cli("put", "-s", daemon.address, "-r", str(tmp_path / "src"), "t").stdout
    wall = time.monotonic() - started
    reported = float(out.split(" in ")[1].split(" s")[0])  # "... 60 files (...) in X s, ..."
    assert "60 files" in out and reported <= wall, (out, wall)


def test_json_records_of_a_tree_stream_out_as_files_complete(daemon, tmp_path):
    small_tree(tmp_path / "src", 30)
    random_file(tmp_path / "src" / "zbig.bin", 24 * 1024 * 1024)
    proc = start_cli("put", "-s", daemon.address, "-r", "--json", "--limit-rate", "4M",
                     str(tmp_path / "src"), "t")
    kill_when(proc, upload_partial_over(daemon, 1024 * 1024), "the big file to be under way")
    records = [json.loads(line) for line in proc.stdout.read().splitlines()]
    assert len(records) == 30 and all(r["path"].startswith("t/d") for r in records)


def test_batch_manifest_sizes_are_counted_as_json_writes_the_names():
    from filesrv.trees import _json_size
    names = ["plain/name.bin", "café/日本語/ñandú.jpg", 'quote"d', "back\\slash", "tab\there",
             "new\nline", "\x7f", "\u2028", "emoji😀", "zero\u200bwidth", "", "\x00"]
    for name in names:
        assert _json_size(name) == len(json.dumps(name, ensure_ascii=False).encode()), name


def blocked_batch(count: int) -> list[dict[str, Any]]:
    """`count` files under b/s/, where `b` is a file on the server, then one good file.

    The names are as short as can be, so the request fits a header; each failure's
    message ("'b' in the path is not a directory") is longer than its request entry.
    """
    digest = xxhash.xxh3_128_hexdigest(b"x")
    return [{"path": f"b/s/{i}", "size": 1, "xxh128": digest} for i in range(count)] + [
        {"path": "good.txt", "size": 1, "xxh128": digest}]


def chunked_items(conn: RawConnection) -> tuple[list[Any], list[int]]:
    """Every item of a chunked reply, and the body size of each chunk."""
    items, lengths = [], []
    while True:
        chunk = conn.read_header()
        assert chunk["ok"] is True, chunk
        body = json.loads(conn.read_body(chunk["length"]))
        assert len(body) == chunk["count"]
        items += body
        lengths.append(chunk["length"])
        if not chunk["more"]:
            return items, lengths


def test_put_files_failures_reach_the_client_however_many(daemon):
    """900 failures do not fit a 64 KiB header: a chunked reply carries them all."""
    (daemon.root / "b").write_bytes(b"a file, not a directory")
    files = blocked_batch(900)
    conn = RawConnection(daemon.port)
    request = {**PutFiles(files).header(), "chunked": True}
    assert conn.request(request) == {"ok": True, "need": [900]}
    conn.send(Data(length=1).frame() + b"x")
    failed, lengths = chunked_items(conn)
    assert len(lengths) > 1  # more than one header's worth
    assert [f["index"] for f in failed] == list(range(900))
    assert {f["code"] for f in failed} == {"not_a_directory"}
    assert all("'b'" in f["message"] for f in failed)
    assert (daemon.root / "good.txt").read_bytes() == b"x"
    assert conn.request({"op": "stat", "path": "good.txt"})["size"] == 1  # still in step
    conn.close()


def test_put_files_failures_fit_the_header_for_a_client_that_does_not_chunk(daemon):
    """Today's clients read `failed` from the header: every index and code is there."""
    (daemon.root / "b").write_bytes(b"a file, not a directory")
    conn = RawConnection(daemon.port)
    assert conn.request(PutFiles(blocked_batch(900)).header())["need"] == [900]
    conn.send(Data(length=1).frame() + b"x")
    placed = conn.read_header()
    assert placed["ok"] is True, placed
    assert [(f["index"], f["code"]) for f in placed["failed"]] == \
        [(i, "not_a_directory") for i in range(900)]
    assert conn.request({"op": "stat", "path": "good.txt"})["size"] == 1
    conn.close()

