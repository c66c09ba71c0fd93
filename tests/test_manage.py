"""File management over the wire: mkdir, mv, rm, hash, ls -l/-r."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import RawConnection, cli, cli_json, random_file, xxh128_of


def test_mkdir_with_and_without_parents(daemon, tmp_path):
    cli("mkdir", "-s", daemon.address, "top")
    assert (daemon.root / "top").is_dir()
    r = cli("mkdir", "-s", daemon.address, "top", check=False)
    assert r.returncode == 4 and "already exists" in r.stderr
    r = cli("mkdir", "-s", daemon.address, "a/b/c", check=False)
    assert r.returncode == 4 and not (daemon.root / "a").exists()
    cli("mkdir", "-s", daemon.address, "-p", "a/b/c", "top")
    assert (daemon.root / "a" / "b" / "c").is_dir()
    (daemon.root / "file").write_bytes(b"x")
    r = cli("mkdir", "-s", daemon.address, "-p", "file", check=False)
    assert r.returncode == 4 and "not a directory" in r.stderr


def test_mv_renames_files_and_directories_atomically(daemon, tmp_path):
    src = random_file(daemon.root / "d" / "f.bin", 1000)
    digest = xxh128_of(src)
    cli("mv", "-s", daemon.address, "d/f.bin", "d/g.bin")
    assert not src.exists() and xxh128_of(daemon.root / "d" / "g.bin") == digest
    cli("mv", "-s", daemon.address, "d", "e")
    assert (daemon.root / "e" / "g.bin").exists() and not (daemon.root / "d").exists()
    (daemon.root / "other.bin").write_bytes(b"old")
    cli("mv", "-s", daemon.address, "e/g.bin", "other.bin")  # replaces a file
    assert xxh128_of(daemon.root / "other.bin") == digest
    (daemon.root / "e" / "taken").mkdir()
    (daemon.root / "taken").write_bytes(b"t")
    for args, status, text in [(["e", "e/inner"], 5, "into itself"),
                               (["missing", "x"], 4, "no such"),
                               (["taken", "e"], 4, "is a directory"),  # e/taken is a dir
                               (["other.bin", "nodir/x"], 4, "no such")]:
        r = cli("mv", "-s", daemon.address, *args, check=False)
        assert r.returncode == status and text in r.stderr, (args, r.stderr)


def test_rm_files_trees_and_never_the_root(daemon, tmp_path):
    random_file(daemon.root / "t" / "a" / "1.bin", 10)
    random_file(daemon.root / "t" / "b" / "2.bin", 10)
    random_file(daemon.root / "single.bin", 10)
    assert cli_json("rm", "-s", daemon.address, "single.bin") == {"path": "single.bin",
                                                                    "removed": 1}
    r = cli("rm", "-s", daemon.address, "t", check=False)
    assert r.returncode == 4 and "-r" in r.stderr and (daemon.root / "t").exists()
    assert cli_json("rm", "-s", daemon.address, "-r", "t")["removed"] == 5
    assert not (daemon.root / "t").exists()
    for root in ("/", ""):
        r = cli("rm", "-s", daemon.address, "-r", root, check=False)
        assert r.returncode == 5 and "root" in r.stderr
    r = cli("rm", "-s", daemon.address, "missing", check=False)
    assert r.returncode == 4
    assert daemon.root.is_dir() and (daemon.root / ".filesrv").is_dir()


def test_rm_of_a_symlink_removes_the_link_not_what_it_points_to(daemon, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.bin").write_bytes(b"keep")
    (daemon.root / "out").symlink_to(outside)
    (daemon.root / "real").mkdir()
    (daemon.root / "real" / "x").write_bytes(b"x")
    (daemon.root / "alias").symlink_to("real")
    cli("rm", "-s", daemon.address, "-r", "out", "alias")
    assert (outside / "keep.bin").read_bytes() == b"keep"
    assert (daemon.root / "real" / "x").exists()
    assert not (daemon.root / "out").is_symlink() and not (daemon.root / "alias").is_symlink()
    (daemon.root / "out").symlink_to(outside)
    r = cli("rm", "-s", daemon.address, "out/keep.bin", check=False)
    assert r.returncode == 5 and (outside / "keep.bin").exists()


def test_read_only_daemon_refuses_rm_mv_and_mkdir(daemon_factory, tmp_path):
    root = tmp_path / "root"
    random_file(root / "f.bin", 10)
    daemon = daemon_factory("--read-only", root=root)
    for args in (["rm", "f.bin"], ["mv", "f.bin", "g.bin"], ["mkdir", "d"]):
        r = cli(args[0], "-s", daemon.address, *args[1:], check=False)
        assert r.returncode == 5 and "read-only" in r.stderr, args
    assert sorted(p.name for p in root.iterdir()) == [".filesrv", "f.bin"]


@pytest.mark.parametrize("header", [
    {"op": "rm", "path": "../x"}, {"op": "rm", "path": "x", "recursive": "yes"},
    {"op": "mv", "src": "a", "dst": "../b"}, {"op": "mv", "src": "a"},
    {"op": "mkdir", "path": "a/../../b"}, {"op": "stat", "path": 7},
])
def test_management_requests_are_validated(daemon, header):
    conn = RawConnection(daemon.port)
    try:
        reply = conn.request(header)
        assert reply["ok"] is False and reply["code"] in ("bad_path", "bad_request"), reply
    finally:
        conn.close()


def test_hash_r_output_checks_with_xxh128sum(daemon, tmp_path):
    tool = shutil.which("xxh128sum")
    if tool is None:
        pytest.skip("xxh128sum not installed (apt-get install xxhash); .ci/run installs it")
    for rel, size in [("a.bin", 1000), ("sub/ünï cødé.bin", 5000), ("sub/deep/z.bin", 0),
                      ("big.bin", 3 * 1024 * 1024)]:
        random_file(daemon.root / "tree" / rel, size)
    sums = cli("hash", "-s", daemon.address, "-r", "tree").stdout
    assert len(sums.splitlines()) == 4
    local = tmp_path / "copy"
    shutil.copytree(daemon.root / "tree", local)
    (tmp_path / "SUMS").write_text(sums)
    check = subprocess.run([tool, "-c", str(tmp_path / "SUMS")], cwd=local,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    (local / "a.bin").write_bytes(b"tampered")
    assert subprocess.run([tool, "-c", str(tmp_path / "SUMS")], cwd=local,
                          capture_output=True).returncode != 0
    one = cli("hash", "-s", daemon.address, "tree/a.bin").stdout.split()
    assert one == [xxh128_of(daemon.root / "tree" / "a.bin"), "tree/a.bin"]
    r = cli("hash", "-s", daemon.address, "tree", check=False)
    assert r.returncode == 4 and "-r" in r.stderr


def test_ls_long_and_recursive(daemon, tmp_path):
    random_file(daemon.root / "x" / "y" / "z.bin", 2048)
    random_file(daemon.root / "top.bin", 10)
    assert cli("ls", "-s", daemon.address).stdout.split() == ["top.bin", "x/"]
    long = cli("ls", "-s", daemon.address, "-l").stdout
    assert "10 B" in long and "top.bin" in long
    tree = cli_json("ls", "-s", daemon.address, "-r")
    assert [(e["name"], e["type"]) for e in tree] == [
        ("top.bin", "file"), ("x", "dir"), ("x/y", "dir"), ("x/y/z.bin", "file")]
    assert [e["name"] for e in cli_json("ls", "-s", daemon.address, "-r", "x")] == \
        ["y", "y/z.bin"]


# ------------------------------------------------------------------ several files, policies

def test_several_sources_like_cp(daemon, tmp_path):
    a = random_file(tmp_path / "a.bin", 100)
    b = random_file(tmp_path / "b.bin", 200)
    out = cli("put", "-s", daemon.address, "--json", str(a), str(b), "docs").stdout
    assert [json.loads(line)["path"] for line in out.splitlines()] == ["docs/a.bin",
                                                                         "docs/b.bin"]
    here = tmp_path / "here"
    here.mkdir()
    cli("get", "-s", daemon.address, "docs/a.bin", "docs/b.bin", str(here))
    assert xxh128_of(here / "a.bin") == xxh128_of(a) and xxh128_of(here / "b.bin") == \
        xxh128_of(b)
    r = cli("get", "-s", daemon.address, "docs/a.bin", "docs/b.bin", str(tmp_path / "nope"),
            check=False)
    assert r.returncode == 9 and "not an existing directory" in r.stderr
    gets = [line for line in daemon.log_text().splitlines() if " get 'docs/" in line]
    assert len({line.split()[1] for line in gets}) == 1  # one connection for both


def test_no_clobber_and_update_policies(daemon, tmp_path):
    v1 = random_file(tmp_path / "v1.bin", 3000)
    v2 = random_file(tmp_path / "v2.bin", 3000)
    cli("put", "-s", daemon.address, str(v1), "f.bin")
    kept = cli_json("put", "-s", daemon.address, "--no-clobber", str(v2), "f.bin")
    assert kept["skipped"] is True and xxh128_of(daemon.root / "f.bin") == xxh128_of(v1)
    same = cli_json("put", "-s", daemon.address, "--update", str(v1), "f.bin")
    assert same["skipped"] is True
    changed = cli_json("put", "-s", daemon.address, "--update", str(v2), "f.bin")
    assert "skipped" not in changed and xxh128_of(daemon.root / "f.bin") == xxh128_of(v2)

    local = tmp_path / "local.bin"
    local.write_bytes(v1.read_bytes())
    kept = cli_json("get", "-s", daemon.address, "--no-clobber", "f.bin", str(local))
    assert kept["skipped"] is True and xxh128_of(local) == xxh128_of(v1)
    got = cli_json("get", "-s", daemon.address, "--update", "f.bin", str(local))
    assert "skipped" not in got and xxh128_of(local) == xxh128_of(v2)
    again = cli_json("get", "-s", daemon.address, "--update", "f.bin", str(local))
    assert again["skipped"] is True
    human = cli("get", "-s", daemon.address, "--update", "f.bin", str(local)).stdout
    assert "skipped f.bin" in human
    r = cli("get", "-s", daemon.address, "--update", "--no-clobber", "f.bin", check=False)
    assert r.returncode == 2
