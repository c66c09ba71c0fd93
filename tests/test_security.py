"""Hardening: tokens, TLS, limits and faults, each proven against the real daemon."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import (CLI, ENV, RawConnection, cli, cli_json, random_file, start_cli,
                      wait_for, xxh128_of)
from filesrv.protocol import Hello
from filesrv.server import HANDSHAKE_SHIELD_SECONDS

TOKEN = "correct-horse-battery-staple-7f3a9c"




@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# filesrv tokens\nanother-token-not-used\n{TOKEN}\n")
    return path


def client_token_file(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / f"client-token-{len(token)}"
    path.write_text(token + "\n")
    return path


# ------------------------------------------------------------------ tokens

def test_server_without_token_file_says_so_at_start(daemon):
    assert "no --token-file" in daemon.log_text()


def test_token_is_required_and_checked(daemon_factory, token_file, tmp_path):
    daemon = daemon_factory("--token-file", str(token_file))
    src = random_file(tmp_path / "a.bin", 1000)
    none = cli("put", "-s", daemon.address, str(src), check=False)
    assert none.returncode == 10 and "requires a token" in none.stderr
    started = time.monotonic()
    wrong = cli("put", "-s", daemon.address, "--token-file",
                str(client_token_file(tmp_path, "guess")), str(src), check=False)
    assert wrong.returncode == 10 and "authentication failed" in wrong.stderr
    assert time.monotonic() - started >= 0.9  # a wrong guess is slowed down
    assert not (daemon.root / "a.bin").exists()
    log = daemon.log_text()
    assert "127.0.0.1:" in log and "authentication failed (no token)" in log
    assert "authentication failed (wrong token)" in log
    ok = cli_json("put", "-s", daemon.address, "--token-file",
                  str(client_token_file(tmp_path)), str(src))
    assert ok["xxh128"] == xxh128_of(src)
    env = {**ENV, "FILESRV_TOKEN": TOKEN}
    via_env = subprocess.run([*CLI, "ls", "-s", daemon.address, "--json"], env=env,
                             capture_output=True, text=True, timeout=30)
    assert via_env.returncode == 0 and "a.bin" in via_env.stdout


def test_commands_before_authentication_are_refused(daemon_factory, token_file):
    daemon = daemon_factory("--token-file", str(token_file))
    conn = RawConnection(daemon.port, handshake=False)
    try:
        greeting = conn.read_header()
        assert greeting["auth"]["method"] == "hmac-sha256" and len(greeting["auth"]["nonce"]) == 64
        conn.send(Hello().frame())
        assert conn.read_header()["ok"] is True
        reply = conn.request({"op": "ls", "path": ""})
        assert reply["ok"] is False and reply["code"] == "auth"
        assert conn.closed_by_server()
    finally:
        conn.close()


def test_each_connection_gets_a_fresh_nonce(daemon_factory, token_file):
    daemon = daemon_factory("--token-file", str(token_file))
    nonces = set()
    for _ in range(3):
        conn = RawConnection(daemon.port, handshake=False)
        nonces.add(conn.read_header()["auth"]["nonce"])
        conn.close()
    assert len(nonces) == 3


def test_unreadable_token_file_is_a_clear_error(tmp_path, daemon):
    r = cli("ls", "-s", daemon.address, "--token-file", str(tmp_path / "missing"), check=False)
    assert r.returncode == 2 and "cannot read token file" in r.stderr
    r = cli("serve", "--root", str(tmp_path / "r"), "--port", "0", "--token-file",
            str(tmp_path / "missing"), check=False)
    assert r.returncode == 2 and "cannot read token file" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ TLS

def test_tls_round_trip_verifies_the_server(daemon_factory, cert, tmp_path):
    crt, key = cert
    daemon = daemon_factory("--tls-cert", str(crt), "--tls-key", str(key))
    src = random_file(tmp_path / "t.bin", 3 * 1024 * 1024 + 3)
    put = cli_json("put", "-s", daemon.address, "--tls", "--cafile", str(crt), str(src))
    got = cli_json("get", "-s", daemon.address, "--tls", "--cafile", str(crt), "t.bin",
                   str(tmp_path / "back.bin"))
    assert put["xxh128"] == got["xxh128"] == xxh128_of(tmp_path / "back.bin") == xxh128_of(src)


def test_tls_client_refuses_an_unverified_certificate_or_host(daemon_factory, cert, tmp_path):
    crt, key = cert
    daemon = daemon_factory("--tls-cert", str(crt), "--tls-key", str(key))
    untrusted = cli("ls", "-s", daemon.address, "--tls", check=False)
    assert untrusted.returncode == 3 and "cannot verify" in untrusted.stderr
    wrong_name = cli("ls", "-s", f"localhost:{daemon.port}", "--tls", "--cafile", str(crt),
                     check=False)
    assert wrong_name.returncode == 3 and "cannot verify" in wrong_name.stderr


def test_plain_client_against_tls_server_fails_fast_and_clearly(daemon_factory, cert):
    crt, key = cert
    daemon = daemon_factory("--tls-cert", str(crt), "--tls-key", str(key),
                            "--handshake-timeout", "30", "--idle-timeout", "30")
    started = time.monotonic()
    r = cli("ls", "-s", daemon.address, check=False)
    assert time.monotonic() - started < 6
    assert r.returncode == 3 and "TLS" in r.stderr and "Traceback" not in r.stderr


def test_tls_client_against_plain_server_fails_fast_and_clearly(daemon, cert):
    crt, _ = cert
    started = time.monotonic()
    r = cli("ls", "-s", daemon.address, "--tls", "--cafile", str(crt), check=False)
    assert time.monotonic() - started < 6
    assert r.returncode == 3 and "TLS" in r.stderr and "Traceback" not in r.stderr


def test_bad_certificate_files_are_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    r = cli("serve", "--root", str(tmp_path / "r"), "--port", "0", "--tls-cert", str(bogus),
            "--tls-key", str(bogus), check=False)
    assert r.returncode == 2 and "cannot load TLS certificate" in r.stderr


class Relay:
    """A loopback TCP relay that records every byte it forwards, both ways."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.recorded = bytearray()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self._spawn(self._accept_loop)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept_loop(self) -> None:
        self.listener.settimeout(0.2)
        for _ in range(10_000):  # bounded: at most ~2000 s of accepting
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            self.sockets += [client, upstream]
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                with self.lock:
                    self.recorded += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def relay_factory() -> Iterator:
    relays: list[Relay] = []

    def make(port: int) -> Relay:
        relays.append(Relay(port))
        return relays[-1]

    yield make
    for r in relays:
        r.close()


def test_token_and_tls_keep_secrets_and_contents_off_the_wire(daemon_factory, cert, token_file,
                                                              relay_factory, tmp_path):
    crt, key = cert
    daemon = daemon_factory("--token-file", str(token_file), "--tls-cert", str(crt),
                            "--tls-key", str(key))
    relay = relay_factory(daemon.port)
    via = f"127.0.0.1:{relay.port}"
    secret = random_file(tmp_path / "secret.bin", 256 * 1024)
    refused = cli("put", "-s", via, "--tls", "--cafile", str(crt), str(secret), check=False)
    assert refused.returncode == 10 and "authentication failed" in refused.stderr
    tokens = ["--token-file", str(client_token_file(tmp_path))]
    cli("put", "-s", via, "--tls", "--cafile", str(crt), *tokens, str(secret))
    cli("get", "-s", via, "--tls", "--cafile", str(crt), *tokens, "secret.bin",
        str(tmp_path / "copy.bin"))
    assert xxh128_of(tmp_path / "copy.bin") == xxh128_of(secret)
    data = secret.read_bytes()
    with relay.lock:
        wire = bytes(relay.recorded)
    assert len(wire) > 2 * len(data)  # the file really crossed the relay, twice
    assert TOKEN.encode() not in wire
    for offset in range(0, len(data), 16 * 1024):
        assert data[offset:offset + 32] not in wire
    assert b"secret.bin" not in wire  # even the names are inside TLS


def test_token_without_tls_never_sends_the_token(daemon_factory, token_file, relay_factory,
                                                 tmp_path):
    daemon = daemon_factory("--token-file", str(token_file))
    relay = relay_factory(daemon.port)
    cli("ls", "-s", f"127.0.0.1:{relay.port}", "--token-file", str(client_token_file(tmp_path)))
    with relay.lock:
        wire = bytes(relay.recorded)
    assert b"hmac-sha256" in wire  # the exchange did happen in the clear
    assert TOKEN.encode() not in wire


# ------------------------------------------------------------------ limits

def tree(root: Path) -> list[tuple[str, int]]:
    """What a client could see: every file and directory outside the state directory."""
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1)
                  for p in root.rglob("*") if ".filesrv" not in p.parts)


def test_read_only_refuses_every_write(daemon_factory, tmp_path):
    root = tmp_path / "root"
    random_file(root / "existing.bin", 100)
    daemon = daemon_factory("--read-only", root=root)
    before = tree(root)
    src = random_file(tmp_path / "new.bin", 100)
    r = cli("put", "-s", daemon.address, str(src), check=False)
    assert r.returncode == 5 and "read-only" in r.stderr
    r = cli("put", "-s", daemon.address, str(src), "existing.bin", check=False)
    assert r.returncode == 5
    assert tree(root) == before
    cli("get", "-s", daemon.address, "existing.bin", str(tmp_path / "e.bin"))


def test_max_file_size_refuses_larger_uploads(daemon_factory, tmp_path):
    daemon = daemon_factory("--max-file-size", "4K")
    small = random_file(tmp_path / "small.bin", 4096)
    big = random_file(tmp_path / "big.bin", 4097)
    cli("put", "-s", daemon.address, str(small))
    r = cli("put", "-s", daemon.address, str(big), check=False)
    assert r.returncode == 5 and "exceeds" in r.stderr
    assert not (daemon.root / "big.bin").exists()
    assert list((daemon.root / ".filesrv" / "partials").iterdir()) == []


def test_handshake_deadline_drops_a_byte_at_a_time_client(daemon_factory, tmp_path):
    daemon = daemon_factory("--handshake-timeout", "1", "--idle-timeout", "30")
    conn = RawConnection(daemon.port, handshake=False)
    try:
        conn.read_header()
        frame = Hello().frame()
        started = time.monotonic()
        closed = False
        for i in range(len(frame) - 1):  # never the last byte
            try:
                conn.send(frame[i:i + 1])
            except OSError:
                closed = True
                break
            time.sleep(0.25)
            if time.monotonic() - started > 5:
                break
        assert closed or conn.closed_by_server()
        assert time.monotonic() - started < 6
    finally:
        conn.close()
    assert "handshake" in daemon.log_text() and "timeout" in daemon.log_text()


def test_slow_clients_do_not_starve_a_new_one(daemon_factory, tmp_path):
    daemon = daemon_factory("--max-children", "3", "--idle-timeout", "2",
                            "--handshake-timeout", "2")
    drips = [RawConnection(daemon.port)]  # this one after its hello: a slow request
    for _ in range(2):  # each older than the shield when the next one comes
        time.sleep(HANDSHAKE_SHIELD_SECONDS)
        drips.append(RawConnection(daemon.port, handshake=False))
        drips[-1].read_header()
    for c in drips:
        c.send(struct.pack(">I", 1000))  # a header that will take 100 s to arrive
    stop = threading.Event()

    def drip() -> None:
        for _ in range(200):  # bounded: 200 x 0.1 s
            if stop.is_set():
                return
            for c in drips:
                try:
                    c.send(b" ")
                except OSError:
                    pass
            time.sleep(0.1)

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        started = time.monotonic()
        wait_for(lambda: cli("ls", "-s", daemon.address, check=False).returncode == 0,
                 timeout=10, what="a new client to be served")
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        dripper.join(timeout=5)
        for c in drips:
            c.close()


# ------------------------------------------------------------------ faults



def test_disk_full_put_reports_no_space_and_resumes_once_space_is_freed(daemon_factory,
                                                                          small_tmpfs, tmp_path):
    root = small_tmpfs / "root"
    filler = random_file(root / "filler.bin", 4 * 1024 * 1024)
    daemon = daemon_factory(root=root)
    src = random_file(tmp_path / "big.bin", 6 * 1024 * 1024)
    r = cli("put", "-s", daemon.address, str(src), check=False)
    assert r.returncode == 7 and "no space" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert daemon.alive() and not (root / "big.bin").exists()
    partials = list((root / ".filesrv" / "partials").glob("*.part"))
    assert partials and partials[0].stat().st_size > 0
    filler.unlink()
    put = cli_json("put", "-s", daemon.address, str(src))
    assert put["resumed_from"] > 0 and xxh128_of(root / "big.bin") == xxh128_of(src)


def test_sigterm_lets_a_transfer_in_flight_finish(daemon_factory, tmp_path):
    daemon = daemon_factory("--grace", "30")
    src = random_file(tmp_path / "g.bin", 4 * 1024 * 1024)
    put = start_cli("put", "-s", daemon.address, "--limit-rate", "2M", str(src), "--json")
    wait_for(lambda: any((daemon.root / ".filesrv" / "partials").glob("*.part")),
             what="the upload to start")
    idle = RawConnection(daemon.port)  # an idle connection must not hold the daemon up
    stopped_at = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert put.wait(timeout=30) == 0, put.stderr.read()
    assert daemon.proc.wait(timeout=30) == 0
    assert time.monotonic() - stopped_at < 15, "waited out the grace period for idle clients"
    assert xxh128_of(daemon.root / "g.bin") == xxh128_of(src)
    assert idle.closed_by_server()
    idle.close()


def test_grace_period_over_the_transfer_is_cut_and_resumes_later(daemon_factory, tmp_path):
    daemon = daemon_factory("--grace", "0.5")
    src = random_file(tmp_path / "g.bin", 16 * 1024 * 1024)
    put = start_cli("put", "-s", daemon.address, "--limit-rate", "2M", "--retries", "0",
                    str(src))
    wait_for(lambda: any((daemon.root / ".filesrv" / "partials").glob("*.part")),
             what="the upload to start")
    time.sleep(0.5)
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 10
    assert put.wait(timeout=30) == 3
    again = daemon_factory(root=daemon.root)
    done = cli_json("put", "-s", again.address, str(src))
    assert done["resumed_from"] > 0 and xxh128_of(again.root / "g.bin") == xxh128_of(src)


def test_stale_partials_are_removed_after_their_age(daemon_factory, tmp_path):
    root = tmp_path / "root"
    partials = root / ".filesrv" / "partials"
    partials.mkdir(parents=True)
    old = partials / ("a" * 40 + ".part")
    fresh = partials / ("b" * 40 + ".part")
    old.write_bytes(b"x" * 10)
    fresh.write_bytes(b"y" * 10)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    daemon = daemon_factory("--partial-max-age", "3600", root=root)
    wait_for(lambda: not old.exists(), what="the stale partial to go")
    # the line is written just after the unlink: waited for, not read at once
    wait_for(lambda: "removed stale partial" in daemon.log_text(), what="its log line")
    assert fresh.exists()


def child_pids(daemon) -> list[int]:
    pid = daemon.proc.pid
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


@pytest.mark.parametrize("victim", ["child", "daemon"])
def test_sigkill_at_any_moment_of_a_put_never_tears_the_final_name(daemon_factory, tmp_path,
                                                                   victim):
    import random
    rng = random.Random(7)
    old = random_file(tmp_path / "old.bin", 2 * 1024 * 1024)
    new = random_file(tmp_path / "new.bin", 2 * 1024 * 1024)
    digests = {xxh128_of(old), xxh128_of(new)}
    daemon = daemon_factory()
    cli("put", "-s", daemon.address, str(old), "target.bin")
    for _ in range(6):
        put = start_cli("put", "-s", daemon.address, "--limit-rate", "8M", "--retries", "0",
                        str(new),
                        "target.bin")
        time.sleep(rng.uniform(0.0, 0.35))
        if victim == "child":
            for pid in child_pids(daemon):
                os.kill(pid, signal.SIGKILL)
        else:
            daemon.crash()
        put.wait(timeout=30)
        assert xxh128_of(daemon.root / "target.bin") in digests
        if victim == "daemon":
            daemon = daemon_factory(root=daemon.root)
        if xxh128_of(daemon.root / "target.bin") == xxh128_of(new):
            cli("put", "-s", daemon.address, str(old), "target.bin")  # start over
    final = cli_json("put", "-s", daemon.address, str(new), "target.bin")
    assert xxh128_of(daemon.root / "target.bin") == final["xxh128"] == xxh128_of(new)
