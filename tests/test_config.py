"""Options from FILESRV_* variables and the daemon's TOML file, below the command line."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import CLI, ENV, Daemon, cli, random_file


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env={**ENV, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_client_options_come_from_the_environment(daemon, tmp_path):
    src = random_file(tmp_path / "e.bin", 100)
    env = {"FILESRV_SERVER": daemon.address, "FILESRV_JSON": "1",
           "FILESRV_BUFFER_SIZE": "7", "FILESRV_NO_CLOBBER": "true"}
    first = run("put", str(src), env=env)
    assert first.returncode == 0 and '"path": "e.bin"' in first.stdout
    again = run("put", str(src), env=env)
    assert '"skipped": true' in again.stdout  # FILESRV_NO_CLOBBER took effect
    bad = run("get", "e.bin", env={"FILESRV_SERVER": daemon.address,
                                   "FILESRV_BUFFER_SIZE": "lots"})
    assert bad.returncode == 2 and "--buffer-size" in bad.stderr


def test_daemon_precedence_command_line_then_environment_then_file(tmp_path):
    config = tmp_path / "filesrv.toml"
    config.write_text(f'root = "{tmp_path / "from-file"}"\nmax-file-size = "1K"\n'
                      'read_only = false\n')
    small = random_file(tmp_path / "s.bin", 1500)

    def start(*extra: str, env: dict[str, str] | None = None) -> Daemon:
        return Daemon(Path("unused"), tmp_path / "d.log", *extra, env=env).start_raw()

    for extra, env, accepted in [
        (("--config", str(config)), {}, False),                                # file: 1K
        (("--config", str(config)), {"FILESRV_MAX_FILE_SIZE": "2K"}, True),    # env wins
        (("--config", str(config), "--max-file-size", "1K"),
         {"FILESRV_MAX_FILE_SIZE": "2K"}, False),                              # CLI wins
    ]:
        before = dict(ENV)
        d = start(*extra, env=env)
        assert ENV == before  # the variables went to this daemon alone
        try:
            assert (tmp_path / "from-file").is_dir()  # the file's root was used
            r = cli("put", "-s", d.address, str(small), check=False)
            assert (r.returncode == 0) is accepted, (extra, env, r.stderr)
        finally:
            d.stop()


def test_config_file_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("max-childrn = 3\n")
    r = run("serve", "--config", str(bad), "--port", "0")
    assert r.returncode == 2 and "unknown option(s) max-childrn" in r.stderr
    bad.write_text("this is = = not toml")
    r = run("serve", "--config", str(bad), "--port", "0")
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    r = run("serve", "--config", str(tmp_path / "missing.toml"), "--port", "0")
    assert r.returncode == 2 and "cannot read config file" in r.stderr
    assert "Traceback" not in r.stderr


def test_recursive_never_comes_from_the_environment(daemon, tmp_path):
    (daemon.root / "d").mkdir()
    (daemon.root / "d" / "f").write_bytes(b"x")
    r = run("rm", "-s", daemon.address, "d", env={"FILESRV_RECURSIVE": "1"})
    assert r.returncode == 4 and (daemon.root / "d" / "f").exists()
