"""What a new user's trial of the client found: each message tells the truth about what
happened (names left out, bytes kept, a file in the way), in one line, with the exit
status the README and `filesrv --help` document. Real daemon, real CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI, ENV, REPO, cli
from filesrv import errors
from filesrv.errors import EXIT_STATUSES, FilesrvError

LEFT_OUT = "filesrv: 2 names on the server are not UTF-8 and were left out"


def plant_names_that_are_not_utf8(root: Path) -> None:
    """srvnu2/ with ok.txt, a Latin-1 file name and a Latin-1 directory name, as the
    trial made them with printf 'caf\\xe9.jpg'."""
    top = os.fsencode(root / "srvnu2")
    os.makedirs(top)
    with open(top + b"/caf\xe9.jpg", "wb") as fh:
        fh.write(b"c\n")
    os.mkdir(top + b"/d\xe9")
    (root / "srvnu2" / "ok.txt").write_bytes(b"d\n")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return cli(*args, cwd=cwd, check=False)


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------- item 1: names left out

@pytest.mark.parametrize("command", [["ls", "srvnu2"], ["ls", "-r"], ["ls", "-l", "srvnu2"],
                                     ["ls", "--json", "srvnu2"], ["hash", "-r", "srvnu2"]])
def test_listings_say_how_many_names_were_left_out_and_succeed(daemon, command):
    plant_names_that_are_not_utf8(daemon.root)
    r = run(*command, "-s", daemon.address)
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [LEFT_OUT]
    assert "ok.txt" in r.stdout


def test_a_listing_with_nothing_left_out_says_nothing(daemon):
    (daemon.root / "plain").mkdir()
    (daemon.root / "plain" / "a.txt").write_bytes(b"a")
    for command in (["ls", "plain"], ["ls", "-r"], ["hash", "-r", "plain"]):
        r = run(*command, "-s", daemon.address)
        assert r.returncode == 0 and r.stderr == "", (command, r.stderr)


@pytest.mark.parametrize("json_output", [False, True])
def test_get_r_that_left_names_out_says_so_and_exits_13_with_the_rest_downloaded(
        daemon, tmp_path: Path, json_output: bool):
    plant_names_that_are_not_utf8(daemon.root)
    out = tmp_path / "out"
    r = run("get", "-r", "-s", daemon.address, *(["--json"] if json_output else []),
            "srvnu2", str(out))
    no_traceback(r)
    assert r.returncode == 13 == errors.NamesLeftOut.exit_status, r.stderr
    assert r.stderr.splitlines() == [LEFT_OUT]
    assert (out / "ok.txt").read_bytes() == b"d\n"
    assert sorted(p.name for p in out.iterdir()) == ["ok.txt"]
    if json_output:
        assert [json.loads(line)["path"] for line in r.stdout.splitlines()] == [
            "srvnu2/ok.txt"]


# ---------------------------------------------------------------- item 3: exit statuses

def every_error_type() -> list[type[FilesrvError]]:
    found, todo = [], [FilesrvError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_the_exit_status_table_covers_every_error_type():
    statuses = {cls.exit_status for cls in every_error_type()}
    assert statuses <= set(EXIT_STATUSES), statuses - set(EXIT_STATUSES)


def test_help_lists_every_exit_status_the_readme_documents():
    """`filesrv --help`, the README and the table in errors.py name the same statuses."""
    helped = cli("--help").stdout
    epilog = " ".join(helped.split("exit status:", 1)[1].split())
    for status, meaning in EXIT_STATUSES.items():
        assert f"{status} {meaning}" in epilog, (status, epilog)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    paragraph = " ".join(readme.split("\nExit status:", 1)[1].split("\n\n", 1)[0].split())
    documented = {int(n) for n in re.findall(r"(?:^|, )(\d+) ",
                                             paragraph.split(". Failures", 1)[0])}
    assert documented == set(EXIT_STATUSES), documented ^ set(EXIT_STATUSES)


# ---------------------------------------------------------------- item 6: plurals

def test_a_tree_summary_counts_one_file_in_the_singular(daemon, tmp_path: Path):
    (daemon.root / "one").mkdir()
    (daemon.root / "one" / "a.txt").write_bytes(b"a")
    (daemon.root / "two").mkdir()
    (daemon.root / "two" / "a.txt").write_bytes(b"a")
    (daemon.root / "two" / "b.txt").write_bytes(b"b")
    one = cli("get", "-r", "-s", daemon.address, "--no-progress", "one", str(tmp_path / "1"))
    two = cli("get", "-r", "-s", daemon.address, "--no-progress", "two", str(tmp_path / "2"))
    assert one.stdout.startswith("downloaded one: 1 file (1 B) in "), one.stdout
    assert two.stdout.startswith("downloaded two: 2 files (2 B) in "), two.stdout
    up = cli("put", "-r", "-s", daemon.address, "--no-progress", str(tmp_path / "1"), "back")
    assert up.stdout.startswith("uploaded back: 1 file (1 B) in "), up.stdout


# ---------------------------------------------------------------- item 7: bad addresses

@pytest.mark.parametrize("address, said", [("", "no host in ''"),
                                           ("garbage::::", "'garbage::::'")])
def test_a_bad_server_address_is_a_usage_error_naming_it(address: str, said: str):
    r = run("ls", "-s", address, "--timeout", "2", "--retries", "0")
    no_traceback(r)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[-1].startswith("filesrv: error: ") and said in r.stderr
    assert "connect" not in r.stderr


def test_an_ipv6_address_still_parses_bare_and_in_brackets():
    from filesrv.client import parse_server
    assert parse_server("::1") == ("::1", 8750)
    assert parse_server("[::1]:9") == ("::1", 9)
    assert parse_server("host:12") == ("host", 12)
