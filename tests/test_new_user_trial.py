"""What a new user's trial of the client found: each message tells the truth about what
happened (names left out, bytes kept, a file in the way), in one line, with the exit
status the README and `filesrv --help` document. Real daemon, real CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import CLI, ENV, REPO, cli, random_file, wait_for
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


# ---------------------------------------------------------------- item 2: a pipe closed early

def test_a_download_through_stdout_into_a_pipe_closed_early_ends_quietly_by_sigpipe(
        daemon, tmp_path: Path):
    """`filesrv get huge.bin /dev/stdout | head -c 10`, with a link of our own to
    /proc/self/fd/1: as coreutils, killed by SIGPIPE (141 in a shell), stderr empty."""
    random_file(daemon.root / "huge.bin", 8 * 1024 * 1024)  # far more than a pipe holds
    stdout = tmp_path / "stdout"
    stdout.symlink_to("/proc/self/fd/1")
    proc = subprocess.Popen([*CLI, "get", "-s", daemon.address, "--no-progress", "huge.bin",
                             str(stdout)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert len(proc.stdout.read(10)) == 10
        proc.stdout.close()  # as head does once it has its 10 bytes
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGPIPE, (proc.returncode, err)
    assert err == b""


# ---------------------------------------------------------------- item 4: names ending in /

def test_get_of_a_remote_directory_with_a_trailing_slash_says_use_r(daemon, tmp_path: Path):
    (daemon.root / "isos").mkdir()
    (daemon.root / "isos" / "a.iso").write_bytes(b"a")
    here = tmp_path / "here"
    here.mkdir()
    r = run("get", "-s", daemon.address, "isos/", cwd=here)
    no_traceback(r)
    assert r.returncode == 4, r.stderr
    assert r.stderr == "filesrv: isos/ is a directory (use -r)\n"
    assert list(here.iterdir()) == []


def test_get_of_a_remote_file_with_a_trailing_slash_says_it_is_a_file(daemon, tmp_path: Path):
    (daemon.root / "a.iso").write_bytes(b"a")
    here = tmp_path / "here"
    here.mkdir()
    r = run("get", "-s", daemon.address, "a.iso/", cwd=here)
    no_traceback(r)
    assert r.returncode == 4 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "not a directory" in r.stderr and "empty path component" not in r.stderr
    assert list(here.iterdir()) == []


def test_get_into_a_local_file_named_with_a_trailing_slash_says_it_is_not_a_directory(
        daemon, tmp_path: Path):
    (daemon.root / "big.iso").write_bytes(b"iso")
    photo = tmp_path / "photos" / "p1.jpg"
    photo.parent.mkdir()
    photo.write_bytes(b"jpeg")
    r = run("get", "-s", daemon.address, "big.iso", "photos/p1.jpg/", cwd=tmp_path)
    no_traceback(r)
    assert r.returncode == 9, r.stderr
    assert r.stderr == "filesrv: photos/p1.jpg/ is not a directory\n"
    assert photo.read_bytes() == b"jpeg" and sorted(os.listdir(photo.parent)) == ["p1.jpg"]
    missing = run("get", "-s", daemon.address, "big.iso", "nowhere/", cwd=tmp_path)
    assert missing.returncode == 9 and "no such local directory nowhere/" in missing.stderr


# ---------------------------------------------------------------- item 5: bytes kept



def test_out_of_space_mid_get_states_the_bytes_actually_kept(daemon, small_tmpfs: Path):
    """The space runs out in the middle of a write (a few KiB left, less than a read):
    the partial holds more than the bytes counted before that write, and the message
    says what it holds, the number a re-run resumes from."""
    random_file(daemon.root / "big.bin", 6 * 1024 * 1024)
    dest = small_tmpfs / "big.bin"
    partial = small_tmpfs / ".big.bin.filesrv-part"
    get = subprocess.Popen([*CLI, "get", "-s", daemon.address, "--limit-rate", "2M",
                            "--buffer-size", "1M", "--no-progress", "big.bin", str(dest)],
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: partial.exists() and partial.stat().st_size > 1024 * 1024,
                 what="the download to start")
        os.kill(get.pid, signal.SIGSTOP)  # while the space is taken, it writes nothing
        try:
            st = os.statvfs(small_tmpfs)
            leave = 3 * 4096  # less than one read: the next write is cut short
            (small_tmpfs / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - leave))
        finally:
            os.kill(get.pid, signal.SIGCONT)
        _, err = get.communicate(timeout=60)
    finally:
        if get.poll() is None:
            get.kill()
            get.wait(timeout=10)
    assert get.returncode == 9, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    kept = re.search(r"the .* \((\d+) bytes\) received are kept in (\S+):", err)
    assert kept is not None, err
    assert int(kept.group(1)) == partial.stat().st_size, (err, partial.stat().st_size)
    assert kept.group(2) == str(partial)
