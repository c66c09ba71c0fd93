"""End to end: the real daemon and the real CLI over loopback."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import cli, cli_json, random_file, xxh128_of

SIZES = [0, 1, 4095, 4096, 1024 * 1024 + 7, 64 * 1024 * 1024]


@pytest.mark.parametrize("size", SIZES)
def test_put_then_get_round_trips_every_size(daemon, tmp_path: Path, size: int):
    src = random_file(tmp_path / "src.bin", size)
    put = cli_json("put", "-s", daemon.address, str(src), "sizes/f.bin")
    assert put == {**put, "path": "sizes/f.bin", "size": size, "resumed_from": 0,
                   "xxh128": xxh128_of(src)}
    assert (daemon.root / "sizes" / "f.bin").read_bytes() == src.read_bytes()
    out = tmp_path / "out.bin"
    got = cli_json("get", "-s", daemon.address, "sizes/f.bin", str(out))
    assert got["xxh128"] == put["xxh128"] and got["size"] == size and got["resumed_from"] == 0
    assert out.read_bytes() == src.read_bytes()
    assert isinstance(got["seconds"], float) and got["seconds"] >= 0


@pytest.mark.parametrize("buffer_size", [1, 7, 4096, 1024 * 1024])
def test_any_buffer_size_on_either_side_moves_the_same_bytes(daemon_factory, tmp_path: Path,
                                                             buffer_size: int):
    daemon = daemon_factory("--buffer-size", str(buffer_size))
    for size in (0, 1, 4095, 4096, 20_000):
        src = random_file(tmp_path / f"src{size}", size)
        cli("put", "-s", daemon.address, "--buffer-size", str(buffer_size), str(src))
        out = tmp_path / f"out{size}"
        got = cli_json("get", "-s", daemon.address, "--buffer-size", str(buffer_size),
                       f"src{size}", str(out))
        assert out.read_bytes() == src.read_bytes()
        assert got["xxh128"] == xxh128_of(src)


def test_digest_is_exactly_what_xxh128sum_prints(daemon, tmp_path: Path):
    tool = shutil.which("xxh128sum")
    if tool is None:
        pytest.skip("xxh128sum not installed (apt-get install xxhash); .ci/run installs it")
    src = random_file(tmp_path / "a.bin", 3 * 1024 * 1024 + 5)
    put = cli_json("put", "-s", daemon.address, str(src))
    reference = subprocess.run([tool, str(src)], capture_output=True, text=True, check=True)
    assert reference.stdout.split()[0] == put["xxh128"]


def test_names_with_spaces_and_unicode(daemon, tmp_path: Path):
    src = random_file(tmp_path / "ünï cødé 文件.bin", 12345)
    remote = "dir with space/ünï cødé 文件.bin"
    put = cli_json("put", "-s", daemon.address, str(src), remote)
    assert put["path"] == remote
    listing = cli_json("ls", "-s", daemon.address, "dir with space")
    assert [e["name"] for e in listing] == ["ünï cødé 文件.bin"]
    back = tmp_path / "back"  # not beside the source: the get must write a file of its own
    back.mkdir()
    got = cli_json("get", "-s", daemon.address, remote, cwd=back)
    assert got["path"] == remote and got["xxh128"] == xxh128_of(src)
    assert (back / "ünï cødé 文件.bin").read_bytes() == src.read_bytes()


def test_remote_defaults_and_directory_targets(daemon, tmp_path: Path):
    src = random_file(tmp_path / "data.bin", 100)
    cli("put", "-s", daemon.address, str(src))                   # -> data.bin
    cli("put", "-s", daemon.address, str(src), "nested/deeper/")  # -> nested/deeper/data.bin
    cli("put", "-s", daemon.address, str(src), "/abs.bin")        # leading / is the root
    assert (daemon.root / "data.bin").exists()
    assert (daemon.root / "nested" / "deeper" / "data.bin").exists()
    assert (daemon.root / "abs.bin").exists()
    here = tmp_path / "here"
    here.mkdir()
    cli("get", "-s", daemon.address, "nested/deeper/data.bin", cwd=here)  # -> ./data.bin
    cli("get", "-s", daemon.address, "abs.bin", str(here))                # dir receives it
    assert sorted(p.name for p in here.iterdir()) == ["abs.bin", "data.bin"]


def test_server_address_comes_from_the_environment(daemon, tmp_path: Path):
    import os
    env = {**os.environ, "FILESRV_SERVER": daemon.address}
    from conftest import CLI, ENV
    env["PYTHONPATH"] = ENV["PYTHONPATH"]
    proc = subprocess.run([*CLI, "ls", "--json"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_get_replaces_an_existing_local_file_only_after_verification(daemon, tmp_path: Path):
    src = random_file(tmp_path / "new.bin", 5000)
    cli("put", "-s", daemon.address, str(src), "f.bin")
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"old contents")
    cli("get", "-s", daemon.address, "f.bin", str(dest))
    assert dest.read_bytes() == src.read_bytes()
    assert not list(tmp_path.glob(".dest.bin.filesrv-part*"))


def test_put_over_an_existing_file_replaces_it_whole(daemon, tmp_path: Path):
    first = random_file(tmp_path / "one.bin", 3000)
    second = random_file(tmp_path / "two.bin", 7000)
    cli("put", "-s", daemon.address, str(first), "f.bin")
    cli("put", "-s", daemon.address, str(second), "f.bin")
    assert (daemon.root / "f.bin").read_bytes() == second.read_bytes()
    assert list((daemon.root / ".filesrv" / "partials").iterdir()) == []


def test_ls_lists_files_and_directories_with_json_fields(daemon, tmp_path: Path):
    src = random_file(tmp_path / "a.bin", 10)
    cli("put", "-s", daemon.address, str(src), "a.bin")
    cli("put", "-s", daemon.address, str(src), "sub/b.bin")
    listing = cli_json("ls", "-s", daemon.address)
    assert [(e["name"], e["type"]) for e in listing] == [("a.bin", "file"), ("sub", "dir")]
    assert listing[0]["size"] == 10 and isinstance(listing[0]["mtime"], float)
    human = cli("ls", "-s", daemon.address).stdout
    assert "a.bin" in human and "sub/" in human


def test_human_output_names_the_file_and_digest(daemon, tmp_path: Path):
    src = random_file(tmp_path / "h.bin", 2048)
    out = cli("put", "-s", daemon.address, str(src)).stdout
    assert "h.bin" in out and xxh128_of(src) in out


def test_progress_bar_is_drawn_on_a_terminal_from_the_resumed_offset(daemon, tmp_path: Path):
    from conftest import run_on_terminal
    src = random_file(daemon.root / "p.bin", 4 * 1024 * 1024)
    dest = tmp_path / "p.bin"
    partial = tmp_path / ".p.bin.filesrv-part"
    # a partial of the first half, as an interrupted get would leave
    cli("get", "-s", daemon.address, "p.bin", str(dest))
    partial.write_bytes(dest.read_bytes()[: 2 * 1024 * 1024])
    etag = daemon_etag(daemon, "p.bin")
    (tmp_path / ".p.bin.filesrv-part.json").write_text(
        json.dumps({"remote": "p.bin", "etag": etag, "size": src.stat().st_size}))
    dest.unlink()
    status, text, stdout = run_on_terminal("get", "-s", daemon.address, "--limit-rate", "8M",
                                           "p.bin", str(dest))
    assert status == 0
    assert "get p.bin" in text and "B/s" in text
    assert "2.0 MiB/4.0 MiB" in text and " 50%" in text, text  # first frame: the resumed half
    assert b"resumed at 2.0 MiB" in stdout


def test_no_progress_bar_when_stderr_is_not_a_terminal(daemon, tmp_path: Path):
    src = random_file(tmp_path / "q.bin", 2 * 1024 * 1024)
    assert cli("put", "-s", daemon.address, str(src)).stderr == ""


def daemon_etag(daemon, remote: str) -> str:
    from conftest import RawConnection
    from filesrv.protocol import Get
    conn = RawConnection(daemon.port)
    try:
        size = (daemon.root / remote).stat().st_size
        return conn.request(Get(path=remote, offset=size).header())["etag"]
    finally:
        conn.close()
