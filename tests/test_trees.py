"""Directory trees: put -r and get -r over one connection, resumable by re-running."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import cli, kill_when, random_file, start_cli, upload_partial_over, xxh128_of

SMALL = 40


def make_tree(root: Path) -> dict[str, str]:
    files = {f"a{i:02d}.bin": 1000 + i for i in range(SMALL)}
    files.update({"sub/ünï cødé/ñ.bin": 5000, "sub/deep/er/z.bin": 0,
                  "zz/big.bin": 8 * 1024 * 1024})
    for rel, size in files.items():
        random_file(root / rel, size)
    (root / "empty" / "dir").mkdir(parents=True)
    return {rel: xxh128_of(root / rel) for rel in files}


def digests_under(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): xxh128_of(p) for p in root.rglob("*")
            if p.is_file() and ".filesrv" not in p.parts}


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_put_and_get_a_tree_keep_files_empty_dirs_and_skip_symlinks(daemon, tmp_path):
    src = tmp_path / "src"
    expected = make_tree(src)
    outside = tmp_path / "secret.txt"
    outside.write_text("not to be uploaded")
    (src / "link.txt").symlink_to(outside)
    put = cli("put", "-s", daemon.address, "-r", "--json", str(src), "trees/one")
    assert "skipped symlink link.txt" in put.stderr
    assert len(records(put.stdout)) == len(expected)
    assert digests_under(daemon.root / "trees" / "one") == expected
    assert (daemon.root / "trees" / "one" / "empty" / "dir").is_dir()
    assert not (daemon.root / "trees" / "one" / "link.txt").exists()

    got = cli("get", "-s", daemon.address, "-r", "trees/one", str(tmp_path / "copy"))
    assert "downloaded trees/one" in got.stdout
    assert digests_under(tmp_path / "copy") == expected
    assert (tmp_path / "copy" / "empty" / "dir").is_dir()


def test_hash_of_a_tree_verifies_a_downloaded_copy_with_xxh128sum(daemon, tmp_path):
    tool = shutil.which("xxh128sum")
    if tool is None:
        pytest.skip("xxh128sum not installed (apt-get install xxhash); .ci/run installs it")
    make_tree(tmp_path / "src")
    cli("put", "-s", daemon.address, "-r", str(tmp_path / "src"), "t")
    cli("get", "-s", daemon.address, "-r", "t", str(tmp_path / "copy"))
    (tmp_path / "SUMS").write_text(cli("hash", "-s", daemon.address, "-r", "t").stdout)
    check = subprocess.run([tool, "-c", str(tmp_path / "SUMS")], cwd=tmp_path / "copy",
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_rerunning_a_finished_tree_transfer_moves_nothing(daemon, tmp_path):
    make_tree(tmp_path / "src")
    cli("put", "-s", daemon.address, "-r", str(tmp_path / "src"), "t")
    again = records(cli("put", "-s", daemon.address, "-r", "--json", str(tmp_path / "src"),
                        "t").stdout)
    assert again and all(r["skipped"] for r in again)
    cli("get", "-s", daemon.address, "-r", "t", str(tmp_path / "copy"))
    again = records(cli("get", "-s", daemon.address, "-r", "--json", "t",
                        str(tmp_path / "copy")).stdout)
    assert again and all(r["skipped"] for r in again)
    assert "0 files" in cli("put", "-s", daemon.address, "-r", str(tmp_path / "src"),
                            "t").stdout


def test_interrupted_put_r_skips_what_is_done_and_resumes_the_cut_file(daemon, tmp_path):
    src = tmp_path / "src"
    expected = make_tree(src)
    proc = start_cli("put", "-s", daemon.address, "-r", "--limit-rate", "4M", str(src), "t")
    kill_when(proc, upload_partial_over(daemon, 1024 * 1024), "the big file to be half way")
    rerun = records(cli("put", "-s", daemon.address, "-r", "--json", str(src), "t").stdout)
    by_path = {r["path"]: r for r in rerun}
    assert all(by_path[f"t/a{i:02d}.bin"].get("skipped") for i in range(SMALL))
    assert by_path["t/zz/big.bin"]["resumed_from"] > 0
    assert digests_under(daemon.root / "t") == expected


def test_interrupted_get_r_skips_what_is_done_and_resumes_the_cut_file(daemon, tmp_path):
    expected = make_tree(daemon.root / "t")
    dest = tmp_path / "copy"
    proc = start_cli("get", "-s", daemon.address, "-r", "--limit-rate", "4M", "t", str(dest))
    partial = dest / "zz" / ".big.bin.filesrv-part"
    kill_when(proc, lambda: partial.exists() and partial.stat().st_size > 1024 * 1024,
              "the big file to be half way")
    rerun = records(cli("get", "-s", daemon.address, "-r", "--json", "t", str(dest)).stdout)
    by_path = {r["path"]: r for r in rerun}
    assert all(by_path[f"t/a{i:02d}.bin"].get("skipped") for i in range(SMALL))
    assert by_path["t/zz/big.bin"]["resumed_from"] > 0
    assert digests_under(dest) == expected


def test_tree_progress_bar_counts_bytes_and_files_on_a_terminal(daemon, tmp_path):
    from conftest import run_on_terminal
    make_tree(tmp_path / "src")
    status, text, _ = run_on_terminal("put", "-r", "-s", daemon.address, "--limit-rate", "16M",
                                      str(tmp_path / "src"), "t")
    assert status == 0
    assert "put t" in text and "B/s" in text
    assert f"/{SMALL + 3} files" in text  # the tree's file count, as the bar's postfix
