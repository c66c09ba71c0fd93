"""contrib/filesrv.service and contrib/filesrv.toml: the daemon as a hardened systemd service.

systemd itself cannot run here (no systemd as PID 1), so the unit is checked by
`systemd-analyze verify` and `systemd-analyze security --offline`, and its command line is
run for real, as the unit would run it, with the shipped example configuration.
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ENV, REPO, Daemon, cli
from filesrv.cli import load_config

UNIT = REPO / "contrib" / "filesrv.service"
EXAMPLE_CONFIG = REPO / "contrib" / "filesrv.toml"
CONFIG_PATH = "/etc/filesrv/filesrv.toml"
EXECUTABLE = "/opt/filesrv/bin/filesrv"  # the venv of README's "Run it as a service"
# systemd-analyze security's overall exposure, in tenths: 2.0 is the top of "OK"
MAX_EXPOSURE = 20


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:  # a missing tool is a failure, never a skip: .ci/run installs it
        pytest.fail("systemd-analyze not found: apt-get install systemd (as .ci/run does)")
    return found


def service_section() -> dict[str, list[str]]:
    """The [Service] directives of the unit, each with every value it is given."""
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       dict_type=_MultiDict)  # type: ignore[arg-type]
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return {key: value.split("\n") for key, value in parser["Service"].items()}


class _MultiDict(dict):  # type: ignore[type-arg]
    """configparser's storage, keeping every value of a directive given several times."""

    def __setitem__(self, key: str, value: object) -> None:
        if isinstance(value, list) and key in self:
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def runnable_copy(tmp_path: Path) -> Path:
    """The unit with its executable at a path that exists here: a launcher running this
    checkout's filesrv. Everything else is verified as shipped."""
    launcher = tmp_path / "bin" / "filesrv"
    launcher.parent.mkdir()
    launcher.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(REPO))} "
                        f"exec python3 -m filesrv \"$@\"\n")
    launcher.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(EXECUTABLE) == 1, "the unit's ExecStart names the README's venv"
    copy = tmp_path / "filesrv.service"
    copy.write_text(text.replace(EXECUTABLE, str(launcher)))
    return copy


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path):
    """Warnings count too. Its Documentation=man:filesrv(1) is checked against the
    repository's man/filesrv.1, installed where man looks (MANPATH)."""
    unit = runnable_copy(tmp_path)
    man1 = tmp_path / "man" / "man1"
    man1.mkdir(parents=True)
    shutil.copy(REPO / "man" / "filesrv.1", man1)
    proc = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True,
                          text=True, timeout=60,
                          env={**ENV, "MANPATH": str(tmp_path / "man")})
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_the_unit_is_hardened_as_documented(tmp_path: Path):
    service = service_section()
    one = {key: values[-1] for key, values in service.items()}
    assert one["User"] and one["User"] != "root" and one["Group"] != "root"
    assert one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict"
    assert one["PrivateTmp"] == "yes"
    assert one["Restart"] == "on-failure"
    assert one["CapabilityBoundingSet"] == ""
    assert one["StandardError"] == "journal" and one["StandardOutput"] == "journal"
    # the only writable place is the root that the example configuration serves
    assert service["ReadWritePaths"] == [_example_root()]
    # SIGTERM reaches the daemon alone, which drains its children within --grace
    assert one["KillMode"] == "mixed"
    assert float(one["TimeoutStopSec"]) > 30  # serve's default --grace
    unit = runnable_copy(tmp_path)
    proc = subprocess.run([systemd_analyze(), "security", "--offline=yes",
                           f"--threshold={MAX_EXPOSURE}", str(unit)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr


def _example_root() -> str:
    return str(load_config(str(EXAMPLE_CONFIG))["root"])


def test_the_units_command_line_serves_with_the_example_config(tmp_path: Path):
    """ExecStart as the unit runs it, over the shipped /etc/filesrv/filesrv.toml (its root
    moved to a temporary directory): the daemon starts, creates and serves that root."""
    argv = shlex.split(service_section()["ExecStart"][-1])
    assert argv == [EXECUTABLE, "serve", "--config", CONFIG_PATH]
    root = tmp_path / "srv" / "filesrv"
    config = tmp_path / "filesrv.toml"
    text = EXAMPLE_CONFIG.read_text()
    config.write_text(text.replace(f'"{_example_root()}"', f'"{root}"'))
    (tmp_path / "hello.txt").write_text("hello\n")
    daemon = Daemon(root, tmp_path / "daemon.log", *argv[2:-1], str(config))
    try:
        daemon.start_raw()  # adds --host 127.0.0.1 --port 0: loopback, a free port
        cli("put", str(tmp_path / "hello.txt"), "-s", daemon.address)
        assert (root / "hello.txt").read_text() == "hello\n"
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_the_image_runs_the_daemon_as_a_non_root_user_owning_its_volumes():
    """The Dockerfile's last USER (the one CMD runs as) is not root, and every path that
    docker-compose.yml mounts a volume on is created in the image with that owner, so a
    new named volume starts out writable by the daemon."""
    lines = (REPO / "Dockerfile").read_text().splitlines()
    users = [i for i, line in enumerate(lines) if line.startswith("USER ")]
    cmd = next(i for i, line in enumerate(lines) if line.startswith("CMD "))
    assert users and users[-1] < cmd
    user = lines[users[-1]].split()[1]
    assert user not in ("root", "0") and not user.startswith("0:")
    compose = (REPO / "docker-compose.yml").read_text()
    mounts = {m.split(":")[1] for m in _compose_volumes(compose) if not m.startswith(".")}
    assert mounts == {"/srv/storage"}
    image = "\n".join(lines)
    for path in mounts:
        assert f"install -d -o {user} -g {user} -m 750 {path}" in image


def _compose_volumes(text: str) -> list[str]:
    """The entries of every `volumes: [...]` list of a service."""
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("volumes: [") and stripped.endswith("]"):
            found += [v.strip().strip('"') for v in stripped[10:-1].split(",")]
    return found
