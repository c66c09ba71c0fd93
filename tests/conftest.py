"""Fixtures that run the real daemon and the real CLI as subprocesses on loopback."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from filesrv.protocol import (PREFIX_SIZE, Hello, encode_frame,  # noqa: E402
                              parse_length_prefix, decode_header)

# no FILESRV_* setting of the shell running the tests reaches the commands under test
ENV = {key: value for key, value in os.environ.items() if not key.startswith("FILESRV_")}
ENV.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
CLI = [sys.executable, "-m", "filesrv"]
START_TIMEOUT = 15.0


@pytest.fixture(autouse=True)
def private_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
                 ) -> Path:
    """Each test's commands get an empty HOME and XDG_CONFIG_HOME of their own, so the
    user's ~/.config/filesrv/config.toml never leaks in (ENV is restored after the test)."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setitem(ENV, "HOME", str(home))
    monkeypatch.setitem(ENV, "XDG_CONFIG_HOME", str(home / ".config"))
    return home


class Daemon:
    """`filesrv serve` on a free loopback port; stopped by its PID at teardown."""

    def __init__(self, root: Path, log_path: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.log_path = log_path
        self.extra = extra
        self.env = {**ENV, **(env or {})}  # a copy: its variables never leak into ENV
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> "Daemon":
        return self._start(["--root", str(self.root), "--host", "127.0.0.1", "--port", "0"])

    def start_raw(self) -> "Daemon":
        """Only the extra arguments: where the root and port come from is under test."""
        return self._start(["--host", "127.0.0.1", "--port", "0"])

    def _start(self, base: list[str]) -> "Daemon":
        self.log = open(self.log_path, "ab")
        # its own session, so a crash test can SIGKILL the daemon and its children at once
        self.proc = subprocess.Popen(
            [*CLI, "serve", *base, *self.extra],
            stdout=subprocess.PIPE, stderr=self.log, env=self.env, start_new_session=True)
        line = _read_line(self.proc, START_TIMEOUT)
        assert "listening on 127.0.0.1:" in line, f"daemon did not start: {line!r}"
        self.port = int(line.split("listening on 127.0.0.1:")[1].split()[0])
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def crash(self) -> None:
        """SIGKILL the daemon and every child it forked."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.log.close()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        try:  # children left behind by a crash() of this same group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data and time.monotonic() < deadline:
        if sel.select(timeout=max(0.0, deadline - time.monotonic())):
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            data += chunk
    sel.close()
    return data.decode(errors="replace")


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(*extra: str, root: Path | None = None) -> Daemon:
        d = Daemon(root or tmp_path / "root", tmp_path / f"daemon{len(started)}.log", *extra)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def daemon(daemon_factory: Any) -> Daemon:
    return daemon_factory()


def cli(*args: str, cwd: Path | None = None, timeout: float = 60,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the filesrv CLI to completion."""
    proc = subprocess.run([*CLI, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"filesrv {' '.join(args)} exited {proc.returncode}: "
                             f"{proc.stderr}")
    return proc


def cli_json(*args: str, cwd: Path | None = None, timeout: float = 60) -> Any:
    out = cli(*args, "--json", cwd=cwd, timeout=timeout).stdout
    return json.loads(out)


def start_cli(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition",
             interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_when(proc: subprocess.Popen[Any], reached: Any, what: str) -> None:
    """SIGKILL `proc` once `reached()` holds; killed in any case, so no test leaves it."""
    try:
        wait_for(lambda: reached() or proc.poll() is not None, what=what)
        assert proc.poll() is None, f"the command finished before it could be killed ({what})"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def upload_partial_over(daemon: Daemon, size: int) -> Any:
    """A condition: some partial upload on the server holds more than `size` bytes."""
    partials = daemon.root / ".filesrv" / "partials"
    return lambda: any(p.stat().st_size > size for p in partials.glob("*.part")
                       if p.exists())


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 1 << 20))
            fh.write(chunk)
            remaining -= len(chunk)
    return path


def xxh128_of(path: Path) -> str:
    import xxhash
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class RawConnection:
    """A hand-driven protocol connection, for hostile and malformed input."""

    def __init__(self, port: int, *, handshake: bool = True, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        if handshake:
            greeting = self.read_header()
            assert greeting["ok"] is True
            self.sock.sendall(Hello().frame())
            assert self.read_header()["ok"] is True

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, header: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(encode_frame(header))
        return self.read_header()

    def _recv_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_header(self) -> dict[str, Any]:
        length = parse_length_prefix(self._recv_exactly(PREFIX_SIZE))
        return decode_header(self._recv_exactly(length))

    def read_body(self, n: int) -> bytes:
        return self._recv_exactly(n)

    def closed_by_server(self) -> bool:
        """True once the server has closed (EOF), reading off anything it still sends."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except (socket.timeout, TimeoutError):
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_connections() -> Iterator[list[RawConnection]]:
    conns: list[RawConnection] = []
    yield conns
    for c in conns:
        c.close()


class FaultProxy:
    """rig/faultproxy.py in front of a daemon, on a free loopback port."""

    def __init__(self, upstream_port: int, *faults: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "rig" / "faultproxy.py"), "--listen", "127.0.0.1:0",
             "--upstream", f"127.0.0.1:{upstream_port}", *faults],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
        line = _read_line(self.proc, START_TIMEOUT)
        assert "faultproxy listening on" in line, line
        self.port = int(line.rsplit(":", 1)[1])
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def fault_proxy() -> Iterator[Any]:
    proxies: list[FaultProxy] = []

    def make(upstream_port: int, *faults: str) -> FaultProxy:
        proxies.append(FaultProxy(upstream_port, *faults))
        return proxies[-1]

    yield make
    for p in proxies:
        p.stop()


def run_on_terminal(*args: str, columns: int = 120, timeout: float = 60
                    ) -> tuple[int, str, bytes]:
    """Run the CLI with stderr on a pseudo-terminal: (status, what it drew, stdout)."""
    import fcntl
    import pty
    import struct
    import termios
    leader, follower = pty.openpty()
    # a real size: with 0 columns tqdm draws nothing
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    drawn = b""
    try:
        proc = subprocess.Popen([*CLI, *args], env=ENV, stdout=subprocess.PIPE, stderr=follower)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _readable(leader):
                drawn += os.read(leader, 65536)
            elif proc.poll() is not None:
                break
        stdout = proc.communicate(timeout=10)[0]
    finally:
        os.close(follower)
        os.close(leader)
    return proc.returncode, drawn.decode(errors="replace"), stdout


def _readable(fd: int) -> bool:
    import select
    return bool(select.select([fd], [], [], 0.1)[0])


@pytest.fixture(scope="session")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 only (its own CA): (cert, key)."""
    folder = tmp_path_factory.mktemp("tls")
    key, crt = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "2", "-subj", "/CN=filesrv-test",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return crt, key


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs of the test's own, unmounted at teardown: a disk that fills."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
