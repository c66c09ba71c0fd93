"""What another program, a deep or wide tree, or odd symlinks on the server's disk can do:
the real daemon and CLI keep serving every other name."""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path
from typing import Any

import xxhash

from conftest import RawConnection, cli, cli_json
from filesrv.protocol import Data, GetFiles, PutFiles


def names_listed(daemon: Any, *args: str) -> list[str]:
    return [e["name"] for e in cli_json("ls", "-s", daemon.address, *args)]


# ------------------------------------------------------------------ names that are not UTF-8

def test_a_name_that_is_not_utf8_is_left_out_and_every_other_name_is_served(
        daemon_factory, tmp_path: Path):
    root = tmp_path / "root"
    (root / "photos" / "sub").mkdir(parents=True)
    (root / "photos" / "ok.jpg").write_bytes(b"fine")
    (root / "photos" / "sub" / "x.txt").write_bytes(b"deeper")
    raw_dir = os.fsencode(root / "photos")
    with open(raw_dir + b"/caf\xe9.jpg", "wb") as fh:  # written by another program
        fh.write(b"latin-1 name")
    os.makedirs(raw_dir + b"/b\xffd")
    with open(raw_dir + b"/b\xffd/inner.txt", "wb") as fh:
        fh.write(b"under a bad name")
    daemon = daemon_factory(root=root)

    assert names_listed(daemon, "photos") == ["ok.jpg", "sub"]
    assert names_listed(daemon, "-r") == ["photos", "photos/ok.jpg", "photos/sub",
                                          "photos/sub/x.txt"]
    reply = RawConnection(daemon.port).request({"op": "ls", "path": "photos"})
    assert reply["ok"] is True and reply["count"] == 2 and reply["skipped"] == 2
    assert "not valid UTF-8" in daemon.log_text() and "internal" not in daemon.log_text()

    cli("get", "-s", daemon.address, "-r", "photos", str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "ok.jpg").read_bytes() == b"fine"
    assert (tmp_path / "copy" / "sub" / "x.txt").read_bytes() == b"deeper"
    sums = cli("hash", "-s", daemon.address, "-r", "photos").stdout.splitlines()
    assert sorted(line.split()[1] for line in sums) == ["ok.jpg", "sub/x.txt"]

    removed = cli_json("rm", "-s", daemon.address, "-r", "photos")
    assert not (root / "photos").exists()  # removed by descriptor, whatever the names
    assert removed["removed"] == 7


# ------------------------------------------------------------------ descriptors

def limit_descriptors(daemon: Any, limit: int = 1024) -> None:
    """`ulimit -n` for the running daemon; the children it forks from now inherit it."""
    assert daemon.proc is not None
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))


def make_chain(top: Path, depth: int) -> None:
    """top/a/a/.../a (depth levels) and a file at the bottom, deeper than a path can say."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("a", dir_fd=fd)
            below = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def test_wide_and_deep_trees_are_walked_and_removed_within_1024_descriptors(daemon):
    limit_descriptors(daemon)
    for i in range(1500):
        (daemon.root / "wide" / f"d{i}").mkdir(parents=True)
    (daemon.root / "wide" / "d7" / "f").write_bytes(b"x")
    make_chain(daemon.root / "deep", 2000)
    try:
        remove_wide_and_deep_trees(daemon)
    finally:  # pytest's own clean-up recurses once per level: too deep for it
        if (daemon.root / "deep").exists():
            subprocess.run(["rm", "-rf", str(daemon.root / "deep")], check=True)


def remove_wide_and_deep_trees(daemon: Any) -> None:
    assert len(names_listed(daemon, "-r", "wide")) == 1501
    assert cli_json("rm", "-s", daemon.address, "-r", "wide")["removed"] == 1502
    assert cli_json("rm", "-s", daemon.address, "-r", "deep")["removed"] == 2002
    assert sorted(os.listdir(daemon.root)) == [".filesrv"]

    tall = "/".join(["m"] * 1100)
    cli("mkdir", "-s", daemon.address, "-p", tall)
    assert (daemon.root / tall).is_dir()
    listed = names_listed(daemon, "-r", "m")
    assert len(listed) == 1099 and listed[-1] == "/".join(["m"] * 1099)
    assert cli_json("rm", "-s", daemon.address, "-r", "m")["removed"] == 1100
    assert "Too many open files" not in daemon.log_text()


# ------------------------------------------------------------------ the state directory

def test_the_state_directory_is_never_listed_through_a_symlink_to_the_root(daemon, tmp_path):
    (daemon.root / "here").symlink_to(".")
    (daemon.root / "d").mkdir()
    (daemon.root / "d" / "up").symlink_to("..")
    (daemon.root / ".filesrv" / "partials" / "someone-elses.part").write_bytes(b"secret")
    for where in ("here", "d/up", "d/up/", "here/here"):
        names = names_listed(daemon, "-r", where) + names_listed(daemon, where)
        assert names and not any(".filesrv" in n or ".part" in n for n in names), (where, names)
    sums = cli("hash", "-s", daemon.address, "-r", "here").stdout
    assert ".filesrv" not in sums
    cli("get", "-s", daemon.address, "-r", "here", str(tmp_path / "copy"))
    assert not (tmp_path / "copy" / ".filesrv").exists()
    for path in ("here/.filesrv/partials/someone-elses.part", "d/up/.filesrv"):
        reply = RawConnection(daemon.port).request({"op": "get", "path": path, "offset": 0})
        assert reply["code"] == "bad_path", (path, reply)


# ------------------------------------------------------------------ symlinks to directories

def test_symlinks_to_directories_answer_per_request_and_per_entry(daemon):
    (daemon.root / "d").mkdir()
    (daemon.root / "d" / "f.txt").write_bytes(b"file in d")
    for name, target in (("here", "."), ("slash", "d/"), ("dl", "d"), ("dotdot", "d/..")):
        (daemon.root / name).symlink_to(target)
    conn = RawConnection(daemon.port)
    for name in ("here", "slash", "dl", "dotdot"):
        assert conn.request({"op": "get", "path": name, "offset": 0})["code"] == "is_a_directory", name
        put = conn.request({"op": "put", "path": name, "size": 1, "source": "s"})
        assert put["code"] == "is_a_directory", name
        assert conn.request({"op": "mkdir", "path": name, "parents": True}) == {"ok": True}
        assert conn.request({"op": "mkdir", "path": name})["code"] == "exists", name
    assert conn.request({"op": "mkdir", "path": "here/made", "parents": True})["ok"] is True
    assert conn.request({"op": "mkdir", "path": "slash/made"})["ok"] is True
    assert (daemon.root / "made").is_dir() and (daemon.root / "d" / "made").is_dir()

    conn.send(GetFiles([{"path": p, "xxh128": None}
                        for p in ("here", "slash", "slash/f.txt", "dotdot/d/f.txt")]).frame())
    assert conn.read_header() == {"ok": True, "count": 4}
    assert conn.read_header()["code"] == "is_a_directory"
    assert conn.read_header()["code"] == "is_a_directory"
    for _ in range(2):
        assert conn.read_header()["length"] == 9 and conn.read_body(9) == b"file in d"

    body = b"new"
    digest = xxhash.xxh3_128_hexdigest(body)
    reply = conn.request(PutFiles([{"path": p, "size": 3, "xxh128": digest}
                                   for p in ("here", "slash", "slash/new.txt")]).header())
    need = reply["need"]
    conn.send(Data(length=3 * len(need)).frame() + body * len(need))
    placed = conn.read_header()
    assert placed["ok"] is True
    assert sorted((f["index"], f["code"]) for f in placed["failed"]) == [
        (0, "is_a_directory"), (1, "is_a_directory")]
    assert (daemon.root / "d" / "new.txt").read_bytes() == body
    assert conn.request({"op": "stat", "path": "slash/f.txt"})["size"] == 9  # still in step
    assert "internal" not in daemon.log_text()
