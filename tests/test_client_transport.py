"""The client's connection set-up, authentication, retries and transport failures."""

from __future__ import annotations

import subprocess

from conftest import CLI, ENV, random_file, xxh128_of

from filesrv.client import Client


def test_a_token_is_harmless_against_a_daemon_that_asks_for_none(daemon, tmp_path):
    random_file(daemon.root / "f.bin", 1000)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    # --timeout 5: before the fix the held-back request was never sent and this waited
    ways = [(["--token-file", str(token_file)], ENV),
            ([], {**ENV, "FILESRV_TOKEN": "s3cret"})]
    for extra, env in ways:
        r = subprocess.run([*CLI, "ls", "-s", daemon.address, "--timeout", "5", *extra],
                           env=env, capture_output=True, text=True, timeout=30)
        assert (r.returncode, r.stdout, r.stderr) == (0, "f.bin\n", "")
        got = subprocess.run([*CLI, "get", "-s", daemon.address, "--timeout", "5", *extra,
                              "f.bin", str(tmp_path / "f.bin")],
                             env=env, capture_output=True, text=True, timeout=30)
        assert got.returncode == 0, got.stderr
        assert xxh128_of(tmp_path / "f.bin") == xxh128_of(daemon.root / "f.bin")
    with Client("127.0.0.1", daemon.port, token=b"s3cret", timeout=5, retries=0) as client:
        assert [e.name for e in client.ls()] == ["f.bin"]
