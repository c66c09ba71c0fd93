"""What the client says on success (-q, -v, piped) and what the daemon's log says (issue 14)."""

from __future__ import annotations

import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import CLI, ENV, cli, random_file, run_on_terminal, wait_for, xxh128_of

# UTC in ISO 8601: a Z, or an offset of +00:00
UTC_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(Z|\+00:00) ")


CLIENT_COMMANDS = ("put", "get", "ls", "list", "rm", "mv", "mkdir", "hash")


def small_tree(root: Path) -> Path:
    """tree/a, tree/sub/b and a symlink (put -r skips it with a note)."""
    random_file(root / "tree" / "a", 1000)
    random_file(root / "tree" / "sub" / "b", 2000)
    (root / "tree" / "link").symlink_to("a")
    return root / "tree"


def silent(*args: str) -> None:
    """The command succeeds and prints nothing at all, on either stream."""
    run = cli(*args)
    assert (run.stdout, run.stderr) == ("", ""), (args, run.stdout, run.stderr)


# ---------------------------------------------------------------- -q

def test_quiet_commands_print_nothing_on_success(daemon, tmp_path):
    s = ("-s", daemon.address)
    tree = small_tree(tmp_path)
    silent("put", "-q", *s, str(tree / "a"), "one")
    silent("put", "-q", "-r", *s, str(tree))  # its note about the symlink too
    silent("get", "-q", *s, "one", str(tmp_path / "one"))
    silent("get", "-q", "-r", *s, "tree", str(tmp_path / "back"))
    silent("mkdir", "-q", *s, "d")
    silent("mv", "-q", *s, "one", "d")
    silent("rm", "-q", "-r", *s, "d")
    assert xxh128_of(tmp_path / "one") == xxh128_of(tree / "a")
    assert xxh128_of(tmp_path / "back" / "sub" / "b") == xxh128_of(tree / "sub" / "b")
    assert not (daemon.root / "d").exists() and (daemon.root / "tree" / "sub" / "b").exists()


def test_quiet_still_reports_an_error_in_one_line(daemon):
    run = cli("rm", "-q", "-s", daemon.address, "missing", check=False)
    assert run.returncode == 4 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "missing" in run.stderr, run.stderr


def test_quiet_draws_no_bar_on_a_terminal(daemon, tmp_path):
    src = random_file(tmp_path / "big.bin", 4 * 1024 * 1024)
    status, drawn, stdout = run_on_terminal("put", "-s", daemon.address, "--limit-rate",
                                            "8M", str(src), "shown")
    assert status == 0 and "%|" in drawn  # the bar this test expects -q to remove
    status, drawn, stdout = run_on_terminal("put", "-q", "-s", daemon.address,
                                            "--limit-rate", "8M", str(src), "hidden")
    assert (status, drawn, stdout) == (0, "", b"")
    assert (daemon.root / "hidden").stat().st_size == src.stat().st_size


def test_quiet_keeps_what_a_command_is_for(daemon, tmp_path):
    s = ("-s", daemon.address)
    src = random_file(tmp_path / "f", 100)
    cli("put", *s, str(src), "f")
    assert cli("ls", "-q", *s).stdout == "f\n"
    assert cli("hash", "-q", *s, "f").stdout == f"{xxh128_of(src)}  f\n"
    put = cli("put", "-q", "--json", *s, str(src), "g")
    assert '"xxh128"' in put.stdout and put.stderr == ""


def test_summaries_go_into_a_pipe_unless_quiet(daemon, tmp_path):
    """Piped (not a terminal), without --json: scripts may read the summary lines."""
    src = random_file(tmp_path / "f", 100)
    piped = subprocess.run([*CLI, "put", "-s", daemon.address, str(src), "f"], env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=60)
    assert piped.returncode == 0 and piped.stdout.startswith("uploaded f: 100 B in ")
    assert piped.stderr == ""
    quiet = subprocess.run([*CLI, "put", "-q", "-s", daemon.address, str(src), "f"],
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=60)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


def test_quiet_from_the_environment_and_verbose_on_the_command_line_wins(daemon):
    env = {**ENV, "FILESRV_QUIET": "1"}
    quiet = subprocess.run([*CLI, "mkdir", "-s", daemon.address, "a"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    loud = subprocess.run([*CLI, "mkdir", "-v", "-s", daemon.address, "b"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert loud.returncode == 0 and loud.stdout == "created b\n"
    assert f"connected to {daemon.address}" in loud.stderr


def test_quiet_and_verbose_together_are_a_usage_error(daemon):
    run = cli("ls", "-q", "-v", "-s", daemon.address, check=False)
    assert run.returncode == 2 and "not allowed with" in run.stderr


# ---------------------------------------------------------------- -v

def test_verbose_names_the_server_and_a_line_per_file_of_a_tree(daemon, tmp_path):
    tree = small_tree(tmp_path)
    put = cli("put", "-v", "-r", "-s", daemon.address, str(tree))
    assert (f"filesrv: connected to {daemon.address} (filesrv/" in put.stderr
            and "protocol version 1, no TLS, no authentication" in put.stderr), put.stderr
    lines = put.stdout.splitlines()
    assert lines[:-1] == [f"uploaded tree/a: 1000 B, xxh128 {xxh128_of(tree / 'a')}",
                          f"uploaded tree/sub/b: 2.0 KiB, xxh128 {xxh128_of(tree / 'sub' / 'b')}"]
    assert lines[-1].startswith("uploaded tree: 2 files")
    again = cli("get", "-v", "-r", "-s", daemon.address, "tree", str(tmp_path / "back"))
    assert sorted(again.stdout.splitlines()[:-1]) == [
        f"downloaded tree/a: 1000 B, xxh128 {xxh128_of(tree / 'a')}",
        f"downloaded tree/sub/b: 2.0 KiB, xxh128 {xxh128_of(tree / 'sub' / 'b')}"]
    rerun = cli("put", "-v", "-r", "-s", daemon.address, str(tree))
    assert "skipped tree/a: already there" in rerun.stdout.splitlines()


def test_verbose_tells_tls_and_authentication(daemon_factory, tmp_path):
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "2", "-subj", "/CN=filesrv-test",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    (tmp_path / "tokens").write_text("a-token-for-the-verbose-test\n")
    daemon = daemon_factory("--tls-cert", str(crt), "--tls-key", str(key),
                            "--token-file", str(tmp_path / "tokens"))
    run = cli("ls", "-v", "-s", daemon.address, "--tls", "--cafile", str(crt),
              "--token-file", str(tmp_path / "tokens"))
    assert re.search(r"TLS \(TLSv1\.[23]\), authenticated with a token", run.stderr), run.stderr


@pytest.mark.parametrize("command", CLIENT_COMMANDS)
def test_help_shows_quiet_and_verbose(command):
    text = cli(command, "--help").stdout
    assert "-q, --quiet" in text and "-v, --verbose" in text, text


# ---------------------------------------------------------------- the daemon's log

def test_every_daemon_log_line_carries_a_utc_timestamp(daemon):
    cli("mkdir", "-s", daemon.address, "d")
    wait_for(lambda: " mkdir " in daemon.log_text(), what="the mkdir line")
    lines = daemon.log_text().splitlines()
    assert lines, "the daemon logged nothing"
    now = datetime.now(timezone.utc)
    for line in lines:
        stamp = UTC_STAMP.match(line)
        assert stamp, f"no UTC timestamp: {line!r}"
        when = datetime.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S").replace(
            tzinfo=timezone.utc)
        # UTC, not local time written with a Z: within minutes of the UTC clock
        assert abs(when - now) < timedelta(minutes=10), (line, now)


def test_a_read_only_daemon_does_not_claim_clients_may_write(daemon_factory):
    ro = daemon_factory("--read-only")
    start = ro.log_text()
    assert "no --token-file" in start, start  # still warns that anyone may connect
    assert "write" not in start, start
    assert "may read the root" in start, start
    rw = daemon_factory(root=ro.root.parent / "rw")
    assert "may read and write the root" in rw.log_text()


def test_a_rename_is_logged_with_both_paths(daemon):
    cli("mkdir", "-s", daemon.address, "old")
    cli("mv", "-s", daemon.address, "old", "new")
    wait_for(lambda: " mv " in daemon.log_text(), what="the mv line")
    line = next(line for line in daemon.log_text().splitlines() if " mv " in line)
    assert " mv 'old' -> 'new' " in line and line.endswith(" ok"), line
