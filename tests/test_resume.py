"""Resume and integrity: processes killed for real, partials damaged for real."""

from __future__ import annotations

import os
import time
from pathlib import Path


from conftest import (RawConnection, cli, cli_json, kill_when, random_file, start_cli, wait_for,
                      xxh128_of)
from filesrv.client import source_tag
from filesrv.protocol import Data, Put

SIZE = 16 * 1024 * 1024
SLOW = "2M"  # bytes per second while we wait to kill: the transfer takes ~8 s


def server_partials(daemon) -> list[Path]:
    return list((daemon.root / ".filesrv" / "partials").glob("*.part"))


def partial_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def kill_when_grown(proc, grown: "callable", what: str) -> None:
    kill_when(proc, lambda: grown() >= 1024 * 1024, what)


def local_partial(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.filesrv-part"


def test_get_resumes_after_client_is_killed(daemon, tmp_path: Path):
    src = random_file(daemon.root / "big.bin", SIZE)
    dest = tmp_path / "big.bin"
    proc = start_cli("get", "-s", daemon.address, "--limit-rate", SLOW, "big.bin", str(dest))
    kill_when_grown(proc, lambda: partial_size([local_partial(dest)]), "the local partial to grow")
    assert not dest.exists(), "a killed get must not leave a file at the final name"
    cut = local_partial(dest).stat().st_size
    got = cli_json("get", "-s", daemon.address, "big.bin", str(dest))
    assert 0 < got["resumed_from"] <= cut
    assert got["xxh128"] == xxh128_of(src) == xxh128_of(dest)
    assert not local_partial(dest).exists()


def test_put_resumes_after_client_is_killed(daemon, tmp_path: Path):
    src = random_file(tmp_path / "big.bin", SIZE)
    proc = start_cli("put", "-s", daemon.address, "--limit-rate", SLOW, str(src), "big.bin")
    kill_when_grown(proc, lambda: partial_size(server_partials(daemon)),
                    "the server partial to grow")
    assert not (daemon.root / "big.bin").exists()
    put = cli_json("put", "-s", daemon.address, str(src), "big.bin")
    assert put["resumed_from"] > 0
    assert put["xxh128"] == xxh128_of(src) == xxh128_of(daemon.root / "big.bin")
    assert server_partials(daemon) == []


def test_put_resumes_after_daemon_is_killed_and_restarted(daemon_factory, tmp_path: Path):
    daemon = daemon_factory()
    src = random_file(tmp_path / "big.bin", SIZE)
    proc = start_cli("put", "-s", daemon.address, "--limit-rate", SLOW, "--retries", "0",
                     str(src), "big.bin")
    wait_for(lambda: partial_size(server_partials(daemon)) >= 1024 * 1024, what="partial")
    daemon.crash()
    assert proc.wait(timeout=30) == 3, proc.stderr.read()  # connection error
    assert not (daemon.root / "big.bin").exists()
    again = daemon_factory(root=daemon.root)
    put = cli_json("put", "-s", again.address, str(src), "big.bin")
    assert put["resumed_from"] > 0
    assert xxh128_of(again.root / "big.bin") == xxh128_of(src)


def test_get_resumes_after_daemon_is_killed_and_restarted(daemon_factory, tmp_path: Path):
    daemon = daemon_factory()
    src = random_file(daemon.root / "big.bin", SIZE)
    dest = tmp_path / "big.bin"
    proc = start_cli("get", "-s", daemon.address, "--limit-rate", SLOW, "--retries", "0",
                     "big.bin", str(dest))
    wait_for(lambda: partial_size([local_partial(dest)]) >= 1024 * 1024, what="partial")
    daemon.crash()
    assert proc.wait(timeout=30) == 3
    assert "run the same command again" in proc.stderr.read()
    again = daemon_factory(root=daemon.root)
    got = cli_json("get", "-s", again.address, "big.bin", str(dest))
    assert got["resumed_from"] > 0
    assert xxh128_of(dest) == xxh128_of(src)


def test_get_starts_over_when_the_remote_file_changed(daemon, tmp_path: Path):
    random_file(daemon.root / "big.bin", SIZE)
    dest = tmp_path / "big.bin"
    proc = start_cli("get", "-s", daemon.address, "--limit-rate", SLOW, "big.bin", str(dest))
    kill_when_grown(proc, lambda: partial_size([local_partial(dest)]), "the local partial to grow")
    replacement = random_file(tmp_path / "v2.bin", SIZE + 10)
    cli("put", "-s", daemon.address, str(replacement), "big.bin")
    got = cli_json("get", "-s", daemon.address, "big.bin", str(dest))
    assert got["resumed_from"] == 0
    assert xxh128_of(dest) == xxh128_of(replacement)


def test_get_refetches_the_whole_file_when_the_partial_is_damaged(daemon, tmp_path: Path):
    src = random_file(daemon.root / "big.bin", SIZE)
    dest = tmp_path / "big.bin"
    proc = start_cli("get", "-s", daemon.address, "--limit-rate", SLOW, "big.bin", str(dest))
    kill_when_grown(proc, lambda: partial_size([local_partial(dest)]), "the local partial to grow")
    with open(local_partial(dest), "r+b") as fh:  # flip one byte inside the partial
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    got = cli_json("get", "-s", daemon.address, "big.bin", str(dest))
    assert got["resumed_from"] == 0  # the second, whole fetch is what verified
    assert xxh128_of(dest) == xxh128_of(src)


def test_put_recovers_when_the_server_partial_is_damaged(daemon, tmp_path: Path):
    src = random_file(tmp_path / "big.bin", SIZE)
    proc = start_cli("put", "-s", daemon.address, "--limit-rate", SLOW, str(src), "big.bin")
    kill_when_grown(proc, lambda: partial_size(server_partials(daemon)),
                    "the server partial to grow")
    (partial,) = server_partials(daemon)
    with open(partial, "r+b") as fh:
        fh.seek(10)
        fh.write(b"damage")
    put = cli_json("put", "-s", daemon.address, str(src), "big.bin")
    assert put["resumed_from"] == 0
    assert xxh128_of(daemon.root / "big.bin") == xxh128_of(src)
    assert "integrity" in daemon.log_text()


def test_put_of_a_changed_local_file_never_splices_onto_the_old_partial(daemon, tmp_path: Path):
    src = random_file(tmp_path / "big.bin", SIZE)
    proc = start_cli("put", "-s", daemon.address, "--limit-rate", SLOW, str(src), "big.bin")
    kill_when_grown(proc, lambda: partial_size(server_partials(daemon)),
                    "the server partial to grow")
    random_file(src, SIZE)  # same name and size, new contents
    put = cli_json("put", "-s", daemon.address, str(src), "big.bin")
    assert put["resumed_from"] == 0
    assert xxh128_of(daemon.root / "big.bin") == xxh128_of(src)


def test_partials_are_never_listed_or_served(daemon, tmp_path: Path):
    src = random_file(tmp_path / "big.bin", SIZE)
    proc = start_cli("put", "-s", daemon.address, "--limit-rate", SLOW, str(src), "big.bin")
    kill_when_grown(proc, lambda: partial_size(server_partials(daemon)),
                    "the server partial to grow")
    assert cli_json("ls", "-s", daemon.address) == []
    refused = cli("get", "-s", daemon.address, ".filesrv/partials/x", check=False)
    assert refused.returncode == 5 and "reserved" in refused.stderr


def test_stalled_upload_is_taken_over_at_once(daemon_factory, tmp_path: Path):
    daemon = daemon_factory("--idle-timeout", "120")
    src = random_file(tmp_path / "big.bin", SIZE)
    data = src.read_bytes()
    stalled = RawConnection(daemon.port)
    try:
        reply = stalled.request(Put(path="big.bin", size=SIZE,
                                    source=source_tag(os.stat(src))).header())
        assert reply == {"ok": True, "offset": 0}
        stalled.send(Data(length=SIZE).frame() + data[: SIZE // 2])
        wait_for(lambda: partial_size(server_partials(daemon)) >= SIZE // 2, what="partial")
        started = time.monotonic()
        put = cli_json("put", "-s", daemon.address, str(src), "big.bin", timeout=60)
        assert time.monotonic() - started < 30, "waited for the stalled holder to time out"
        assert put["resumed_from"] == SIZE // 2
        assert xxh128_of(daemon.root / "big.bin") == xxh128_of(src)
        wait_for(lambda: "superseded" in daemon.log_text(), what="the stalled put to be logged")
    finally:
        stalled.close()
