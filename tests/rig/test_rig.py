"""The docker-compose rig: real hosts, real faults, replicas behind HAProxy.

Run with rig/run.sh (builds what is missing, runs these, tears everything down).
Every container, network and volume belongs to one compose project, removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import wait_for

pytestmark = pytest.mark.rig

REPO = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose") and ["docker-compose"] or ["docker", "compose"]
MiB = 1024 * 1024
SERVER_PARTIALS = "/srv/storage/.filesrv/partials/*.part"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_base() -> str:
    probe = subprocess.run(["docker", "image", "inspect", "filesrv-base:bookworm"],
                           capture_output=True)
    return "filesrv-base:bookworm" if probe.returncode == 0 else "python:3.12-slim"


class Rig:
    def __init__(self) -> None:
        self.project = os.environ.get("RIG_PROJECT", f"filesrv-rig-{os.getpid()}")
        self.env = {**os.environ,
                    "BASE_IMAGE": os.environ.get("BASE_IMAGE") or _default_base(),
                    "FILESRV_TAG": os.environ.get("FILESRV_TAG", "rig"),
                    "FILESRV_PORT": str(_free_port()),
                    "RIG_SUBNET": os.environ.get("RIG_SUBNET", "10.201.7.0/24")}

    def compose(self, *args: str, check: bool = True, timeout: float = 300,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*COMPOSE, "-p", self.project, *args], cwd=REPO,
                              env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)}: {proc.stderr[-2000:]}")
        return proc

    def sh(self, service: str, command: str, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", service, "sh", "-c", command, check=check,
                            timeout=timeout)

    def sh_background(self, service: str, command: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*COMPOSE, "-p", self.project, "exec", "-T", service, "sh",
                                 "-c", command], cwd=REPO, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def healthy(self, service: str) -> bool:
        cid = self.container(service)
        return bool(cid) and subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Health.Status}}", cid],
            capture_output=True, text=True).stdout.strip() == "healthy"

    def wait_healthy(self, service: str, timeout: float = 60) -> None:
        wait_for(lambda: self.healthy(service), timeout, f"{service} to be healthy",
                 interval=0.5)

    def wait_until_grown(self, service: str, pattern: str, size: int, what: str) -> None:
        """Until a file matching `pattern` in `service` holds `size` bytes (a transfer is
        under way); polled gently, each look is a docker exec."""
        wait_for(lambda: self.size_of(service, pattern) >= size, 60, what, interval=0.3)

    def size_of(self, service: str, pattern: str) -> int:
        out = self.sh(service, f"stat -c %s {pattern} 2>/dev/null || true").stdout.split()
        return max((int(x) for x in out), default=0)

    def kill_and_restart(self, service: str) -> None:
        """SIGKILL a service's container and start it again (its volume survives)."""
        self.compose("kill", "-s", "SIGKILL", service)
        self.compose("up", "-d", service)

    def xxh128sum(self, service: str, path: str) -> str:
        return self.sh(service, f"xxh128sum '{path}'").stdout.split()[0]


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    if shutil.which("docker") is None:
        pytest.fail("no docker CLI: the rig needs a Docker engine (see rig/run.sh)")
    r = Rig()
    r.compose("--profile", "faults", "--profile", "replicas", "build", "--force-rm",
              timeout=900)
    r.compose("up", "-d", "server", "client", timeout=300)
    r.wait_healthy("server")
    try:
        yield r
    finally:
        r.compose("--profile", "faults", "--profile", "replicas", "down", "-v",
                  "--remove-orphans", check=False, timeout=300)


def make_file(rig: Rig, path: str, mib: int) -> str:
    rig.sh("client", f"head -c {mib}M /dev/urandom > '{path}'")
    return rig.xxh128sum("client", path)


def finished(proc: subprocess.Popen[str], timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------ 1. round trips

def test_put_and_get_between_containers_match_xxh128sum(rig: Rig):
    digest = make_file(rig, "/tmp/round.bin", 24)
    put = json.loads(rig.sh("client", "filesrv put /tmp/round.bin dir/round.bin --json").stdout)
    assert put["xxh128"] == digest == rig.xxh128sum("server", "/srv/storage/dir/round.bin")
    got = json.loads(rig.sh("client", "filesrv get dir/round.bin /tmp/back.bin --json").stdout)
    assert got["xxh128"] == digest == rig.xxh128sum("client", "/tmp/back.bin")


def test_the_daemon_runs_unprivileged_and_owns_its_volume(rig: Rig):
    """The image's user, not root, runs `filesrv serve` (PID 1 of the server container)
    and owns the root on the named volume, so uploads land there as that user."""
    daemon = rig.sh("server", "ps -o user=,uid=,args= -p 1").stdout.split(None, 2)
    assert daemon[0] == "filesrv" and daemon[1] != "0" and "filesrv serve" in daemon[2]
    rig.sh("client", "echo owned > /tmp/owned.txt && filesrv put /tmp/owned.txt owned.txt")
    owners = rig.sh("server", "stat -c %U /srv/storage /srv/storage/owned.txt").stdout
    assert owners.split() == ["filesrv", "filesrv"]


# ------------------------------------------------------------------ 2. server killed

def through_a_server_kill(rig: Rig, command: str, service: str, partial: str) -> dict:
    """Run `command` on the client; SIGKILL and restart the server once `partial` (in
    `service`) holds 32 MiB; the command's --json result."""
    job = rig.sh_background("client", command)
    rig.wait_until_grown(service, partial, 32 * MiB, "the transfer to be under way")
    rig.kill_and_restart("server")
    return finished(job)


def test_server_sigkilled_mid_transfer_and_restarted_put_and_get_resume(rig: Rig):
    digest = make_file(rig, "/tmp/big.bin", 256)
    result = through_a_server_kill(
        rig, "filesrv put --limit-rate 32M --retries 8 --json /tmp/big.bin big.bin",
        "server", SERVER_PARTIALS)
    assert result["resumed_from"] > 0 and result["xxh128"] == digest
    rig.wait_healthy("server")
    assert rig.xxh128sum("server", "/srv/storage/big.bin") == digest

    result = through_a_server_kill(
        rig, "filesrv get --limit-rate 32M --retries 8 --json big.bin /tmp/big-back.bin",
        "client", "/tmp/.big-back.bin.filesrv-part")
    assert result["resumed_from"] > 0 and result["xxh128"] == digest
    assert rig.xxh128sum("client", "/tmp/big-back.bin") == digest


# ------------------------------------------------------------------ 3. client cut off

def test_client_disconnected_from_the_network_and_reconnected_resumes(rig: Rig):
    digest = make_file(rig, "/tmp/net.bin", 128)
    network = f"{rig.project}_rig"
    client = rig.container("client")
    put = rig.sh_background("client", "filesrv put --limit-rate 24M --timeout 3 --retries 8 "
                            "--json /tmp/net.bin net.bin")
    rig.wait_until_grown("server", SERVER_PARTIALS, 24 * MiB, "the upload to be under way")
    subprocess.run(["docker", "network", "disconnect", network, client], check=True)
    time.sleep(5)  # longer than the client's --timeout: the connection is given up
    subprocess.run(["docker", "network", "connect", "--alias", "client", network, client],
                   check=True)
    result = finished(put)
    assert result["resumed_from"] > 0 and result["xxh128"] == digest
    assert rig.xxh128sum("server", "/srv/storage/net.bin") == digest


# ------------------------------------------------------------------ 4. a bad link

def test_transfers_through_the_fault_proxy_complete_and_verify(rig: Rig):
    faults = {"FAULT_ARGS": "--latency-ms 2 --rate 40M --stall-every 16M --stall-seconds 1 "
                            "--cut-after 12M --cut-connections 2"}
    rig.compose("--profile", "faults", "up", "-d", "faultproxy", env=faults)
    digest = make_file(rig, "/tmp/bad.bin", 48)
    put = json.loads(rig.sh("client", "filesrv put -s faultproxy:9000 --retries 8 --json "
                            "/tmp/bad.bin bad.bin").stdout)
    assert put["resumed_from"] > 0 and put["xxh128"] == digest
    assert rig.xxh128sum("server", "/srv/storage/bad.bin") == digest
    # a fresh proxy, so that the download's first two connections are cut too
    rig.compose("--profile", "faults", "up", "-d", "--force-recreate", "faultproxy", env=faults)
    got = json.loads(rig.sh("client", "filesrv get -s faultproxy:9000 --retries 8 --json "
                            "bad.bin /tmp/bad-back.bin").stdout)
    assert got["resumed_from"] > 0 and rig.xxh128sum("client", "/tmp/bad-back.bin") == digest


# ------------------------------------------------------------------ 5. replicas

def serving_replica(rig: Rig) -> str:
    """The replica with a child process serving a connection (forked filesrv)."""
    for _ in range(50):
        for replica in ("server-a", "server-b"):
            count = rig.sh(replica, "ps -eo comm | grep -c filesrv || true").stdout.strip()
            if int(count or 0) >= 2:
                return replica
        time.sleep(0.2)
    raise AssertionError("no replica is serving the transfer")


def replicas_up(rig: Rig) -> None:
    rig.compose("--profile", "replicas", "up", "-d", "haproxy", "server-a", "server-b")
    rig.wait_healthy("server-a")
    rig.wait_healthy("server-b")


def test_cut_on_one_replica_resumes_through_the_other(rig: Rig):
    replicas_up(rig)
    digest = make_file(rig, "/tmp/rep.bin", 192)
    put = rig.sh_background("client", "filesrv put -s haproxy:8750 --limit-rate 32M "
                            "--retries 8 --json /tmp/rep.bin rep.bin")
    rig.wait_until_grown("server-a", SERVER_PARTIALS, 32 * MiB, "the upload to be under way")
    victim = serving_replica(rig)
    survivor = "server-b" if victim == "server-a" else "server-a"
    rig.compose("kill", "-s", "SIGKILL", victim)
    result = finished(put)
    assert result["resumed_from"] > 0 and result["xxh128"] == digest
    assert rig.xxh128sum(survivor, "/srv/storage/rep.bin") == digest
    rig.compose("--profile", "replicas", "up", "-d", victim)
    rig.wait_healthy(victim)


def test_concurrent_puts_to_one_name_through_both_replicas_never_tear(rig: Rig):
    replicas_up(rig)
    digests = {make_file(rig, f"/tmp/v{i}.bin", 16) for i in range(4)}
    puts = [rig.sh_background("client", f"filesrv put -s haproxy:8750 --retries 8 --json "
                              f"/tmp/v{i}.bin same.bin") for i in range(4)]
    for p in puts:
        finished(p)
    assert rig.xxh128sum("server-a", "/srv/storage/same.bin") in digests
    leftovers = rig.sh("server-b", "ls /srv/storage/.filesrv/partials | wc -l").stdout.strip()
    assert leftovers == "0"
