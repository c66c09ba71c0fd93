"""`filesrv completion bash|zsh`: scripts that complete commands, options, local and remote
paths, tried in a real bash; shtab is imported by that command alone."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENV, REPO, Daemon, cli


def script(shell: str) -> str:
    return cli("completion", shell).stdout


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "filesrv.bash"
    path.write_text(script("bash"))
    return path


@pytest.fixture
def on_path(tmp_path: Path) -> Path:
    """A `filesrv` on PATH running this checkout, as the installed command would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "filesrv"
    launcher.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m filesrv \"$@\"\n")
    launcher.chmod(0o755)
    return bin_dir


def complete(bash_script: Path, line: str, cwd: Path | None = None,
             path: Path | None = None) -> list[str]:
    """What bash offers for TAB at the end of `line`: the script sourced in a real bash,
    its completion function called as readline calls it (COMP_WORDS, COMP_CWORD)."""
    words = line.split(" ")
    driver = (f"source {shlex.quote(str(bash_script))}\n"
              f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
              f"COMP_CWORD={len(words) - 1}\nCOMP_LINE={shlex.quote(line)}\n"
              f"COMP_POINT={len(line)}\n"
              "_fsrv_complete filesrv \"${COMP_WORDS[COMP_CWORD]}\" "
              "\"${COMP_WORDS[COMP_CWORD-1]}\" 2>/dev/null\n"
              "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    env = dict(ENV)
    if path is not None:
        env["PATH"] = f"{path}:{env['PATH']}"
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", driver], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [word for word in proc.stdout.splitlines() if word]


def test_the_bash_script_is_valid_bash(bash_script: Path):
    proc = subprocess.run(["bash", "-n", str(bash_script)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "complete -o bashdefault -F _fsrv_complete filesrv" in bash_script.read_text()


def test_bash_completes_commands(bash_script: Path):
    assert complete(bash_script, "filesrv pu") == ["put"]
    assert set(complete(bash_script, "filesrv ")) == {
        "serve", "put", "get", "ls", "list", "rm", "mv", "mkdir", "hash", "completion", "help"}
    assert complete(bash_script, "filesrv help m") == ["mv", "mkdir"]
    assert complete(bash_script, "filesrv completion ") == ["bash", "zsh"]


def test_bash_completes_puts_options_and_only_its_own(bash_script: Path):
    assert complete(bash_script, "filesrv put --n") == ["--no-progress", "--no-clobber"]
    offered = set(complete(bash_script, "filesrv put -"))
    assert {"-r", "--recursive", "-s", "--server", "--limit-rate", "--update", "--json",
            "--tls", "--token-file"} <= offered
    assert "--fsync" not in offered and "--root" not in offered  # get's, serve's
    assert complete(bash_script, "filesrv get --fs") == ["--fsync"]
    assert complete(bash_script, "filesrv serve --read") == ["--read-only"]
    # after an option that takes a value, the next word is not taken for a positional
    assert complete(bash_script, "filesrv list --j") == ["--json"]


def test_bash_completes_local_paths(bash_script: Path, tmp_path: Path):
    (tmp_path / "small.bin").write_bytes(b"x")
    (tmp_path / "photos").mkdir()
    assert complete(bash_script, "filesrv put sm", cwd=tmp_path) == ["small.bin"]
    assert complete(bash_script, "filesrv put -r pho", cwd=tmp_path) == ["photos"]
    assert complete(bash_script, "filesrv put --token-file sm", cwd=tmp_path) == ["small.bin"]
    assert complete(bash_script, "filesrv serve --root p", cwd=tmp_path) == ["photos"]


def test_bash_completes_remote_paths_from_the_server_named_on_the_line(
        bash_script: Path, daemon: Daemon, tmp_path: Path, on_path: Path):
    (daemon.root / "isos" / "old").mkdir(parents=True)
    (daemon.root / "isos" / "a.iso").write_bytes(b"a")
    (daemon.root / "big.iso").write_bytes(b"b")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # no local file may answer for the remote ones
    server = f"-s {daemon.address}"
    assert complete(bash_script, f"filesrv get {server} ", elsewhere, on_path) == [
        "big.iso", "isos/"]
    assert complete(bash_script, f"filesrv rm {server} isos/", elsewhere, on_path) == [
        "isos/a.iso", "isos/old/"]
    assert complete(bash_script, f"filesrv mv --server {daemon.address} isos/a.iso is",
                    elsewhere, on_path) == ["isos/"]
    # without an answering server, nothing remote is offered (and no error is printed)
    assert complete(bash_script, "filesrv get -s 127.0.0.1:9 is", elsewhere, on_path) == []


def test_the_zsh_script_is_valid_zsh():
    text = script("zsh")
    assert text.startswith("#compdef filesrv")
    zsh = shutil.which("zsh")
    if zsh is None:  # a failure, never a skip: .ci/run installs zsh
        pytest.fail("zsh not found: apt-get install zsh (as .ci/run does)")
    proc = subprocess.run([zsh, "-n"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for word in ("_fsrv_remote_paths", "--no-clobber", "--fsync", "completion"):
        assert word in text
    # a colon in an argument's name would split its zsh spec (-s would then swallow
    # the words after it): -s's HOST:PORT|REMOTE is named by its option instead
    assert ":HOST:PORT" not in text and "]:SERVER:" in text


def test_an_unknown_shell_is_a_usage_error():
    proc = cli("completion", "fish", check=False)
    assert proc.returncode == 2 and "invalid choice: 'fish'" in proc.stderr


def imported_modules(*args: str) -> str:
    """`python -X importtime` of a filesrv run: every module it imported, on stderr."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "filesrv", *args],
                          env=ENV, capture_output=True, text=True, timeout=60)
    return proc.stderr


def test_a_normal_run_never_imports_shtab(daemon: Daemon):
    assert " shtab" in imported_modules("completion", "bash")  # the check can see it
    assert " shtab" not in imported_modules("--help")
    assert " shtab" not in imported_modules("ls", "-s", daemon.address)
    assert " filesrv.completion" not in imported_modules("ls", "-s", daemon.address)


def test_without_shtab_the_command_says_what_is_missing():
    blocker = ("import sys; sys.modules['shtab'] = None; from filesrv.cli import main; "
               "sys.exit(main(['completion', 'bash']))")
    proc = subprocess.run([sys.executable, "-c", blocker], env=ENV, capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == ("filesrv: filesrv completion needs the shtab package "
                           "(pip install shtab)\n")
