"""The client never splices, never replaces what is not a file, and downloads every name.

Real daemons on loopback, the real CLI as a subprocess, real files changed under it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import cli, cli_json, kill_when, random_file, start_cli, xxh128_of
from filesrv.client import NAME_MAX, partial_name

SLOW = "2M"  # bytes per second while a test acts mid-transfer
BIG = 4 * 1024 * 1024  # large enough to travel alone (not in a batch) and to resume

# ---------------------------------------------------------------- long names

LONGEST = "é" * 127 + "z"  # 255 bytes in UTF-8: the longest name a server can hold


def local_partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".filesrv-part")]


def test_partial_names_fit_name_max_and_are_stable():
    for name in (LONGEST, "a" * 255, "a" * 232, "a" * 233, "x" * 199 + "é" * 28):
        partial = partial_name(name)
        assert len(os.fsencode(partial + ".json.tmp")) <= NAME_MAX, name
        assert partial == partial_name(name)  # a resume finds the same partial
        assert partial.startswith(".") and partial.endswith(".filesrv-part")
        partial.encode("utf-8")  # not cut inside a character
    assert partial_name("a" * 254 + "b") != partial_name("a" * 254 + "c")
    assert partial_name("short.iso") == ".short.iso.filesrv-part"  # unchanged when it fits


def test_every_name_the_server_holds_downloads(daemon, tmp_path: Path):
    small = random_file(daemon.root / "tree" / LONGEST, 1000)
    big = random_file(daemon.root / "tree" / ("b" * 255), BIG)
    out = tmp_path / "out"
    out.mkdir()
    for source in (small, big):
        got = cli_json("get", "-s", daemon.address, f"tree/{source.name}", str(out) + "/")
        assert got["xxh128"] == xxh128_of(source) == xxh128_of(out / source.name)
    cli("get", "-r", "-s", daemon.address, "tree", str(tmp_path / "copy"))
    for source in (small, big):
        assert xxh128_of(tmp_path / "copy" / source.name) == xxh128_of(source)
    assert local_partials(out) == [] and local_partials(tmp_path / "copy") == []


def test_a_download_with_the_longest_name_resumes(daemon, tmp_path: Path):
    source = random_file(daemon.root / LONGEST, BIG)
    out = tmp_path / "out"
    out.mkdir()
    proc = start_cli("get", "-s", daemon.address, "--limit-rate", SLOW, LONGEST, str(out) + "/")
    kill_when(proc, lambda: sum(p.stat().st_size for p in local_partials(out)) > 1024 * 1024,
              "the local partial to grow")
    assert not (out / LONGEST).exists()
    got = cli_json("get", "-s", daemon.address, LONGEST, str(out) + "/")
    assert got["resumed_from"] > 0
    assert got["xxh128"] == xxh128_of(source) == xxh128_of(out / LONGEST)
    assert local_partials(out) == []
