"""The command line as users of git, cp, mv and rm expect it: help, aliases, habits."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path


from conftest import CLI, ENV, _read_line, cli, cli_json, random_file

COMMANDS = {"serve": "run the daemon", "put": "upload files", "get": "download files",
            "ls": "list a remote directory", "rm": "delete remote files",
            "mv": "rename a remote file", "mkdir": "create remote directories",
            "hash": "print XXH3-128 digests", "help": "show a command's options"}
# --retries is every client command's: ls and hash ask again after a torn reply
TRANSFER_ONLY = ("--limit-rate", "--buffer-size", "--no-progress", "--fsync",
                 "--no-clobber", "--update")


# ---------------------------------------------------------------- help

def test_filesrv_alone_lists_each_command_with_a_line_and_succeeds():
    r = cli()
    lines = r.stdout.splitlines()
    for name, summary in COMMANDS.items():
        assert any(line.split()[:1] == [name] and summary in line for line in lines), name
    assert "filesrv help COMMAND" in r.stdout and r.stderr == ""


def test_help_command_is_command_dash_dash_help():
    for name in [*COMMANDS, "list"]:
        assert cli("help", name).stdout == cli(name, "--help").stdout, name
    assert cli("help").stdout == cli().stdout
    r = cli("help", "nosuch", check=False)
    assert r.returncode == 2 and "no command 'nosuch'" in r.stderr


def test_each_commands_help_shows_only_its_options_and_ends_with_examples():
    helps = {name: cli(name, "--help").stdout for name in COMMANDS}
    for name in ("ls", "rm", "mv", "mkdir", "hash"):
        for option in TRANSFER_ONLY:
            assert option not in helps[name], (name, option)
    for name in ("put", "get"):
        for option in ("--limit-rate", "--buffer-size", "--retries", "--no-clobber"):
            assert option in helps[name], (name, option)
    assert "--fsync" in helps["get"] and "--fsync" not in helps["put"]
    assert "get:" not in helps["put"]
    for name, text in helps.items():
        examples = text.rstrip("\n").split("\nexamples:\n")[-1].splitlines()
        assert "\nexamples:\n" in text and 2 <= len(examples) <= 3, name
        assert all(line.startswith(f"  filesrv {name}") for line in examples), name


def test_usage_lines_and_errors_name_arguments_alike():
    for name, argument in (("put", "LOCAL"), ("get", "REMOTE"), ("mv", "SRC"),
                           ("rm", "REMOTE"), ("mkdir", "REMOTE_DIR"), ("hash", "REMOTE")):
        r = cli(name, check=False)
        usage, error = r.stderr.split(f"filesrv {name}: error: ")
        assert r.returncode == 2 and f"required: {argument}" in error, (name, r.stderr)
        assert usage.startswith("usage: filesrv " + name) and argument in usage, usage


def test_list_is_an_alias_of_ls(daemon):
    random_file(daemon.root / "d" / "f.bin", 10)
    assert cli("list", "-s", daemon.address, "-r").stdout == "d/\nd/f.bin\n"
    assert cli("list", "-s", daemon.address, "--json", "d").stdout == \
        cli("ls", "-s", daemon.address, "--json", "d").stdout


# ---------------------------------------------------------------- habits

def test_short_options_combine_as_in_coreutils(daemon):
    random_file(daemon.root / "t" / "a" / "1.bin", 10)
    assert cli("ls", "-s", daemon.address, "-lr", "t").stdout == \
        cli("ls", "-s", daemon.address, "-l", "-r", "t").stdout
    assert len(cli("ls", "-s", daemon.address, "-lr", "t").stdout.splitlines()) == 2
    cli("rm", "-s", daemon.address, "-rf", "t")
    assert not (daemon.root / "t").exists()


def test_rm_f_ignores_missing_paths_and_removes_the_rest(daemon):
    random_file(daemon.root / "here.bin", 10)
    random_file(daemon.root / "file.bin", 10)
    r = cli("rm", "-s", daemon.address, "-f", "gone", "here.bin", "file.bin/below", "no/such")
    assert r.stdout == "removed here.bin\n" and r.stderr == ""
    assert not (daemon.root / "here.bin").exists() and (daemon.root / "file.bin").exists()
    assert cli_json("rm", "-s", daemon.address, "-f", "gone") == {"path": "gone", "removed": 0}
    r = cli("rm", "-s", daemon.address, "gone", check=False)
    assert r.returncode == 4 and "no such" in r.stderr


def test_mkdir_p_of_an_existing_directory_is_silent(daemon):
    (daemon.root / "there").mkdir()
    r = cli("mkdir", "-s", daemon.address, "-p", "there")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert cli("mkdir", "-s", daemon.address, "-p", "/").stdout == ""  # the root exists too
    r = cli("mkdir", "-s", daemon.address, "-p", "there", "new/deep")
    assert r.stdout == "created new/deep\n" and (daemon.root / "new" / "deep").is_dir()
    assert cli_json("mkdir", "-s", daemon.address, "-p", "there") == {"path": "there",
                                                                      "created": False}
    r = cli("mkdir", "-s", daemon.address, "there", check=False)  # without -p: an error
    assert r.returncode == 4 and "already exists" in r.stderr


def test_put_into_an_existing_remote_directory_as_cp_does(daemon, tmp_path):
    src = random_file(tmp_path / "f.bin", 1000)
    (daemon.root / "dir").mkdir()
    for policy in ((), ("--no-clobber",), ("--update",)):
        got = cli_json("put", "-s", daemon.address, *policy, str(src), "dir")
        assert got["path"] == "dir/f.bin" and "skipped" not in got, policy
        (daemon.root / "dir" / "f.bin").unlink()
    cli("put", "-s", daemon.address, str(src), "dir/")
    assert (daemon.root / "dir" / "f.bin").read_bytes() == src.read_bytes()
    cli("put", "-s", daemon.address, str(src), "newname")  # not a directory: the name
    assert (daemon.root / "newname").read_bytes() == src.read_bytes()
    (daemon.root / "dir" / "dir").mkdir()
    r = cli("put", "-s", daemon.address, str(src), "dir/dir", check=False)  # one level only
    assert r.returncode == 0 and (daemon.root / "dir" / "dir" / "f.bin").is_file()
    (daemon.root / "dir" / "f.bin").unlink()
    (daemon.root / "dir" / "f.bin").mkdir()
    r = cli("put", "-s", daemon.address, str(src), "dir", check=False)
    assert r.returncode == 4 and "'dir/f.bin' is a directory" in r.stderr


def test_mv_into_an_existing_directory_as_mv_does(daemon):
    (daemon.root / "dir").mkdir()
    random_file(daemon.root / "a.bin", 10)
    random_file(daemon.root / "b.bin", 10)
    random_file(daemon.root / "tree" / "t.bin", 10)
    assert cli("mv", "-s", daemon.address, "a.bin", "dir").stdout == "moved a.bin -> dir/a.bin\n"
    cli("mv", "-s", daemon.address, "b.bin", "dir/")
    cli("mv", "-s", daemon.address, "tree", "dir")
    assert sorted(p.name for p in (daemon.root / "dir").iterdir()) == ["a.bin", "b.bin", "tree"]
    assert cli_json("mv", "-s", daemon.address, "dir/a.bin", "/") == {"src": "dir/a.bin",
                                                                     "dst": "/a.bin"}
    # "nodir/" names a directory that is not there: refused, never a rename to "nodir"
    r = cli("mv", "-s", daemon.address, "a.bin", "nodir/", check=False)
    assert r.returncode == 4 and (daemon.root / "a.bin").exists()
    assert not (daemon.root / "nodir").exists()


# ---------------------------------------------------------------- where the server is

def test_without_s_the_client_uses_the_daemons_default_address(tmp_path):
    """The Quick start as written: `filesrv serve` then `filesrv ls`, no address anywhere."""
    random_file(tmp_path / "storage" / "quick.bin", 10)
    daemon = _serve_with_defaults(tmp_path)
    try:
        r = cli("ls", cwd=tmp_path)
        assert r.stdout == "quick.bin\n"
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
        if daemon.stdout:
            daemon.stdout.close()


def _serve_with_defaults(cwd: Path) -> subprocess.Popen[bytes]:
    """`filesrv serve` with no option at all; the port may be taken for a while by another
    test run on this machine, so try again a few times."""
    line = ""
    for _ in range(20):
        proc = subprocess.Popen([*CLI, "serve"], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        line = _read_line(proc, 15)
        if "listening on 127.0.0.1:8750" in line:
            return proc
        proc.kill()
        _, err = proc.communicate(timeout=10)
        line += err.decode(errors="replace")
        time.sleep(0.5)
    raise AssertionError(f"the daemon could not listen on 127.0.0.1:8750: {line}")


# ---------------------------------------------------------------- the client's config file

TOKEN = "a-token-for-the-config-tests-5d1e"


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    """The CLI with extra environment variables (None: remove the variable)."""
    merged = {**ENV, **(env or {})}
    return subprocess.run([*CLI, *args], env={k: v for k, v in merged.items() if v is not None},
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def user_config(text: str, mode: int = 0o644) -> Path:
    """Write the test user's $XDG_CONFIG_HOME/filesrv/config.toml."""
    path = Path(ENV["XDG_CONFIG_HOME"]) / "filesrv" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path




def test_tests_never_read_the_users_own_config(private_home):
    assert ENV["HOME"] == str(private_home) != os.environ.get("HOME")
    assert ENV["XDG_CONFIG_HOME"] == str(private_home / ".config")
    assert not any(key.startswith("FILESRV_") for key in ENV)


def test_config_file_defaults_below_environment_and_command_line(daemon, tmp_path):
    user_config(f'server = "{daemon.address}"\njson = true\n')
    random_file(daemon.root / "f.bin", 10)
    assert json.loads(run("ls").stdout)[0]["name"] == "f.bin"  # both from the file
    assert run("ls", env={"FILESRV_JSON": "0"}).stdout == "f.bin\n"  # the environment wins
    r = run("ls", env={"FILESRV_SERVER": "127.0.0.1:1"})
    assert r.returncode == 3 and "127.0.0.1:1" in r.stderr
    assert json.loads(run("ls", "-s", daemon.address, env={"FILESRV_SERVER": "127.0.0.1:1"}
                          ).stdout)[0]["name"] == "f.bin"  # the command line wins
    # without XDG_CONFIG_HOME the file is ~/.config/filesrv/config.toml
    assert run("ls", env={"XDG_CONFIG_HOME": None}).stdout.startswith("[")
    # --config and FILESRV_CONFIG name another file, instead of that one
    other = tmp_path / "other.toml"
    other.write_text(f'server = "{daemon.address}"\n')
    assert run("ls", "--config", str(other)).stdout == "f.bin\n"
    assert run("ls", env={"FILESRV_CONFIG": str(other)}).stdout == "f.bin\n"


def test_a_named_remote_brings_its_server_token_and_tls(daemon_factory, cert, tmp_path):
    crt, key = cert
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    daemon = daemon_factory("--token-file", str(tokens), "--tls-cert", str(crt),
                            "--tls-key", str(key))
    random_file(daemon.root / "f.bin", 10)
    config = user_config(f'json = true\n[remote.nas]\nserver = "{daemon.address}"\n'
                         'token-file = "nas.token"\ntls = true\n'
                         f'cafile = "{crt}"\nlimit-rate = "1M"\njson = false\n')
    (config.parent / "nas.token").write_text(TOKEN + "\n")  # relative to the file
    assert run("ls", "-s", "nas").stdout == "f.bin\n"  # the remote's json = false wins
    assert run("ls", env={"FILESRV_SERVER": "nas"}).stdout == "f.bin\n"
    r = run("ls", "-s", daemon.address, "--tls", "--cafile", str(crt))  # no remote, no token
    assert r.returncode == 10
    r = run("ls", "-s", "nas", "--timeout", "5", env={"FILESRV_TOKEN": "wrong"})
    assert r.returncode == 10  # the environment's token wins over the file's


def test_unknown_keys_in_the_config_file_are_a_one_line_error(daemon):
    for text, named in [('sever = "x"\n', "unknown option(s) sever"),
                        ('recursive = true\n', "unknown option(s) recursive"),
                        ('root = "/srv"\n', "unknown option(s) root"),  # a serve option
                        ('[remote.nas]\nserver = "h"\nlimit_rat = "1M"\n',
                         "[remote.nas]: unknown option(s) limit_rat"),
                        ('[remote.nas]\ntls = true\n', "[remote.nas] needs server"),
                        ('remote = "nas"\n', "[remote.NAME]"),
                        ('this is = = not toml\n', "not valid TOML")]:
        user_config(text)
        r = run("ls", "-s", daemon.address)
        assert r.returncode == 2 and named in r.stderr, (text, r.stderr)
        assert len(r.stderr.splitlines()) == 1, r.stderr
    user_config('timeout = "soon"\n')  # values are checked as on the command line
    r = run("ls", "-s", daemon.address)
    assert r.returncode == 2 and "--timeout" in r.stderr


def test_a_token_in_the_config_file_requires_a_private_file(daemon_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    daemon = daemon_factory("--token-file", str(tokens))
    text = f'[remote.nas]\nserver = "{daemon.address}"\ntoken = "{TOKEN}"\n'
    for mode in (0o644, 0o640, 0o660, 0o602):
        path = user_config(text, mode)
        r = run("ls", "-s", "nas")
        assert r.returncode == 2 and f"chmod 600 {path}" in r.stderr, (oct(mode), r.stderr)
    user_config(text, 0o600)
    assert run("ls", "-s", "nas").returncode == 0
    user_config(f'[remote.nas]\nserver = "{daemon.address}"\n', 0o644)  # no token: no rule
    assert run("ls", "-s", "nas").returncode == 10
