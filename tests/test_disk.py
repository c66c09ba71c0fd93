"""What another program, a deep or wide tree, or odd symlinks on the server's disk can do:
the real daemon and CLI keep serving every other name."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import xxhash

from conftest import RawConnection, cli, cli_json, wait_for
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

    got = cli("get", "-s", daemon.address, "-r", "photos", str(tmp_path / "copy"), check=False)
    assert got.returncode == 13, got.stderr  # every other name arrived; the tree is short
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


# ------------------------------------------------------------------ out of space, partials

@pytest.fixture
def tmpfs_with_few_inodes(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=64", "tmpfs",
                        str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def use_every_inode(where: Path) -> list[Path]:
    where.mkdir()
    made: list[Path] = []
    for i in range(200):  # nr_inodes=64: runs out long before
        try:
            (where / f"f{i}").touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return made
        made.append(where / f"f{i}")
    raise AssertionError("the file system never ran out of inodes")


def test_no_free_inode_for_a_partial_answers_no_space_at_once(daemon_factory,
                                                               tmpfs_with_few_inodes, tmp_path):
    root = tmpfs_with_few_inodes / "root"
    daemon = daemon_factory(root=root)
    fillers = use_every_inode(root / "fill")
    src = tmp_path / "small.bin"
    src.write_bytes(b"x" * 5000)
    r = cli("put", "-s", daemon.address, str(src), check=False)
    assert r.returncode == 7 and "no space" in r.stderr, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "no_space" in daemon.log_text()  # answered, not a dropped connection
    assert daemon.alive() and list((root / ".filesrv" / "partials").iterdir()) == []
    for f in fillers[:5]:
        f.unlink()
    cli("put", "-s", daemon.address, str(src))
    assert (root / "small.bin").read_bytes() == src.read_bytes()


def test_a_put_that_never_sends_a_byte_leaves_no_partial_behind(daemon):
    partials = daemon.root / ".filesrv" / "partials"
    for i in range(3):
        conn = RawConnection(daemon.port)
        reply = conn.request({"op": "put", "path": f"never{i}.bin", "size": 1000, "source": "s"})
        assert reply == {"ok": True, "offset": 0}
        assert len(list(partials.iterdir())) == 1  # the upload holds its partial meanwhile
        conn.close()
        wait_for(lambda: not list(partials.iterdir()), timeout=10,
                 what="the empty partial to be removed")


def hold_posix_lock(path: Path) -> subprocess.Popen[str]:
    """Another live process (as a replica sharing the root would be) holding a lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys\n"
         f"f = open({str(path)!r}, 'r+')\nfcntl.lockf(f, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


def test_temporaries_a_crash_left_are_removed_at_start_but_not_a_live_batch(daemon_factory,
                                                                           tmp_path):
    partials = tmp_path / "root" / ".filesrv" / "partials"
    partials.mkdir(parents=True)
    orphans = ["batch-4242-0.part", "batch-4242-1.part",            # before batches had locks
               "batch-00aa-0.part", "batch-00aa.lock",              # its process is gone
               "0123456789abcdef0123456789abcdef01234567.part"]     # a put that sent nothing
    kept = ["batch-11bb-0.part", "batch-11bb.lock",                 # a live replica's batch
            "fedcba9876543210fedcba9876543210fedcba98.part"]        # a put to resume
    for name in orphans + kept:
        (partials / name).write_bytes(b"" if name.endswith(("lock", "567.part")) else b"bytes")
    holder = hold_posix_lock(partials / "batch-11bb.lock")
    try:
        daemon = daemon_factory(root=tmp_path / "root")
        wait_for(lambda: not any((partials / n).exists() for n in orphans), timeout=10,
                 what="the start-up sweep to remove the orphaned temporaries")
        assert sorted(os.listdir(partials)) == sorted(kept)
        assert "removed stale partial upload batch-4242-0.part" in daemon.log_text()
    finally:
        holder.kill()
        holder.wait(timeout=10)
