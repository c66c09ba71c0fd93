"""The client's connection set-up, authentication, retries and transport failures."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import xxhash
from conftest import CLI, ENV, RawConnection, random_file, start_cli, wait_for, xxh128_of

from filesrv.client import Client, RetryPolicy
from filesrv.connection import server_failure
from filesrv.errors import BadRequest, Busy, ConnectionFailed, ProtocolError, error_from_code
from filesrv.protocol import (Entry, FrameBuffer, Hello, encode_frame, encode_listing, greeting,
                              ok_reply)
from filesrv.transport import PeerClosed, TornFrame


def test_a_token_is_harmless_against_a_daemon_that_asks_for_none(daemon, tmp_path):
    random_file(daemon.root / "f.bin", 1000)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    # --timeout 5: before the fix the held-back request was never sent and this waited
    ways = [(["--token-file", str(token_file)], ENV),
            ([], {**ENV, "FILESRV_TOKEN": "s3cret"})]
    for extra, env in ways:
        r = subprocess.run([*CLI, "ls", "-s", daemon.address, "--timeout", "5", *extra],
                           env=env, capture_output=True, text=True, timeout=30)
        assert (r.returncode, r.stdout, r.stderr) == (0, "f.bin\n", "")
        got = subprocess.run([*CLI, "get", "-s", daemon.address, "--timeout", "5", *extra,
                              "f.bin", str(tmp_path / "f.bin")],
                             env=env, capture_output=True, text=True, timeout=30)
        assert got.returncode == 0, got.stderr
        assert xxh128_of(tmp_path / "f.bin") == xxh128_of(daemon.root / "f.bin")
    with Client("127.0.0.1", daemon.port, token=b"s3cret", timeout=5, retries=0) as client:
        assert [e.name for e in client.ls()] == ["f.bin"]


# ---------------------------------------------------------------- torn and malformed replies

class FakeServer:
    """A loopback server that greets as filesrv does, reads one request per connection and
    answers it with `answers[n]` for the n-th connection (the last one for any later)."""

    def __init__(self, answers: list[Callable[[socket.socket, dict[str, Any]], None]]) -> None:
        self.answers = answers
        self.requests: list[dict[str, Any]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, TimeoutError):
                continue
            with conn:
                conn.settimeout(10)
                try:
                    self._answer(conn)
                except OSError:
                    pass

    def _answer(self, conn: socket.socket) -> None:
        frames = FrameBuffer()

        def next_header() -> dict[str, Any]:
            while (header := frames.next_header()) is None:
                data = conn.recv(65536)
                if not data:
                    raise ConnectionResetError("client left")
                frames.feed(data)
            return header

        conn.sendall(encode_frame(greeting("fake/1", None)))
        next_header()  # hello
        conn.sendall(encode_frame(greeting("fake/1", None)))
        request = next_header()
        self.requests.append(request)
        self.answers[min(len(self.requests), len(self.answers)) - 1](conn, request)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.listener.close()


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeServer]]:
    servers: list[FakeServer] = []

    def make(*answers: Callable[[socket.socket, dict[str, Any]], None]) -> FakeServer:
        servers.append(FakeServer(list(answers)))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


BODY = bytes(range(256)) * 40  # the fake server's one file, "f.bin"
LISTING = encode_listing([Entry("a.txt", "file", 3, 1.0), Entry("sub", "dir", 0, 2.0)])


def good_reply(request: dict[str, Any]) -> tuple[bytes, bytes]:
    """(header frame, body) of a correct answer to an ls or a get of f.bin."""
    if request["op"] == "ls":
        return encode_frame(ok_reply(length=len(LISTING), count=2)), LISTING
    offset = request["offset"]
    header = ok_reply(size=len(BODY), offset=offset, length=len(BODY) - offset, etag="e1",
                      xxh128=xxhash.xxh3_128_hexdigest(BODY))
    return encode_frame(header), BODY[offset:]


def answer_well(conn: socket.socket, request: dict[str, Any]) -> None:
    conn.sendall(b"".join(good_reply(request)))


def torn(where: str) -> Callable[[socket.socket, dict[str, Any]], None]:
    """An answer cut at `where`, then the connection closed."""
    def answer(conn: socket.socket, request: dict[str, Any]) -> None:
        header, body = good_reply(request)
        cut = {"mid-prefix": header[:2], "mid-header": header[: len(header) // 2],
               "mid-body": header + body[: len(body) // 2]}[where]
        conn.sendall(cut)
    return answer


def malformed(kind: str) -> Callable[[socket.socket, dict[str, Any]], None]:
    def answer(conn: socket.socket, request: dict[str, Any]) -> None:
        header, body = good_reply(request)
        if kind == "garbage-header":
            conn.sendall(struct.pack(">I", 9) + b"not json!")
        elif kind == "wrong-field-type":
            conn.sendall(encode_frame(ok_reply(length="many", size=None)))
        else:  # an over-long length prefix
            conn.sendall(struct.pack(">I", 1 << 30) + b"{}")
        time.sleep(0.5)  # the client must not wait for the close to make up its mind
    return answer


def run_against(server: FakeServer, command: str, tmp_path: Path, *extra: str
                ) -> subprocess.CompletedProcess[str]:
    target = ["f.bin", str(tmp_path / "f.bin")] if command == "get" else []
    return subprocess.run([*CLI, command, "-s", server.address, "--timeout", "10", *extra,
                           *target], env=ENV, capture_output=True, text=True, timeout=60)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    return r.stderr


@pytest.mark.parametrize("command", ["ls", "get"])
@pytest.mark.parametrize("where", ["mid-prefix", "mid-header", "mid-body"])
def test_a_reply_torn_anywhere_is_a_connection_failure(fake_server, tmp_path, command, where):
    server = fake_server(torn(where))
    r = run_against(server, command, tmp_path, "--retries", "0")
    assert r.returncode == 3, r.stderr
    assert "connection" in one_line_error(r)
    assert not (tmp_path / "f.bin").exists()


@pytest.mark.parametrize("command", ["ls", "get"])
@pytest.mark.parametrize("where", ["mid-prefix", "mid-header", "mid-body"])
def test_a_reply_torn_anywhere_is_retried(fake_server, tmp_path, command, where):
    server = fake_server(torn(where), answer_well)
    r = run_against(server, command, tmp_path, "--retries", "1")
    assert r.returncode == 0, r.stderr
    assert len(server.requests) == 2 and server.requests[0]["op"] == command
    if command == "ls":
        assert r.stdout == "a.txt\nsub/\n"
    else:
        assert (tmp_path / "f.bin").read_bytes() == BODY


@pytest.mark.parametrize("command", ["ls", "get"])
@pytest.mark.parametrize("kind", ["garbage-header", "wrong-field-type", "oversized-header"])
def test_a_malformed_reply_is_a_protocol_error_not_a_refusal(fake_server, tmp_path, command,
                                                           kind):
    server = fake_server(malformed(kind), answer_well)
    r = run_against(server, command, tmp_path, "--retries", "3")
    assert r.returncode == ProtocolError.exit_status == 11, r.stderr
    assert "malformed reply from the server" in one_line_error(r)
    assert len(server.requests) == 1  # a broken server is not asked again
    assert not (tmp_path / "f.bin").exists()


def test_failure_mapping_keeps_the_servers_own_errors():
    """The server's bad_request (it refused our request) stays a refusal, exit 5."""
    from_server = error_from_code("bad_request", "no")
    assert server_failure(from_server) is from_server
    assert isinstance(server_failure(BadRequest("torn")), ProtocolError)
    assert isinstance(server_failure(TornFrame("cut")), ConnectionFailed)
    assert isinstance(server_failure(PeerClosed()), ConnectionFailed)
    assert isinstance(server_failure(ConnectionResetError(104, "reset")), ConnectionFailed)
    assert server_failure(ConnectionResetError()).retryable  # type: ignore[attr-defined]


# ---------------------------------------------------------------- busy

def test_a_busy_server_is_waited_for_up_to_the_timeout(daemon_factory):
    daemon = daemon_factory("--max-children", "8", "--idle-timeout", "2")
    (daemon.root / "here.txt").write_text("x")
    # past their hello, so they keep their slots (the daemon drops the oldest connection
    # still in its handshake to make room for a newcomer)
    held = [RawConnection(daemon.port) for _ in range(8)]
    conns = held + [RawConnection(daemon.port, handshake=False) for _ in range(32)]
    busy_for = 3.0  # the slots are held this long, then left idle (closed 2 s later)
    try:
        assert not any(c.read_header()["ok"] for c in conns[8:])  # the other 32: busy
        ls = start_cli("ls", "-s", daemon.address)
        until = time.monotonic() + busy_for
        while time.monotonic() < until:  # traffic, so the idle timeout does not free them
            for c in held:
                assert c.request({"op": "stat", "path": ""})["ok"]
            time.sleep(0.5)
        out, err = ls.communicate(timeout=60)
    finally:
        for c in conns:
            c.close()
    assert ls.returncode == 0, err
    assert out == "here.txt\n"
    # said once, on one line: busy, and that it waits
    assert len(err.splitlines()) == 1 and "busy" in err and "waiting up to 60 s" in err


def test_the_retry_policy_backs_off_with_jitter_within_its_caps():
    policy = RetryPolicy(reconnects=5)
    assert [policy.reconnect_delay(i) for i in range(6)] == [0.5, 1, 2, 4, 8, 8]
    for retry in range(12):
        step = min(0.25 * 2 ** retry, policy.busy_backoff_max)
        delays = {policy.busy_delay(retry, 100.0) for _ in range(50)}
        assert all(step / 2 <= d <= step for d in delays)
        assert len(delays) > 1  # jittered
        assert policy.busy_delay(retry, 0.1) <= 0.1  # never past the budget
        assert policy.busy_delay(retry, -1.0) == 0.0


def test_a_client_gives_up_on_a_busy_server_when_its_policy_says(daemon_factory):
    """The Client's busy budget comes from its RetryPolicy (by default its timeout), and
    on_wait hears once that it waits."""
    assert Client("127.0.0.1", 1, timeout=7, retries=2).retry == \
        RetryPolicy(reconnects=2, busy_seconds=7)
    daemon = daemon_factory("--max-children", "1")
    holder = RawConnection(daemon.port)
    told: list[str] = []
    try:
        with Client("127.0.0.1", daemon.port, retry=RetryPolicy(busy_seconds=1.5),
                    on_wait=told.append) as client:
            with pytest.raises(Busy, match="gave up after"):
                client.ls()
    finally:
        holder.close()
    assert len(told) == 1 and "busy" in told[0] and "waiting up to 1.5 s" in told[0]




def test_a_busy_tls_server_is_busy_not_a_tls_failure(daemon_factory, cert):
    """A TLS server at its limit closes before the handshake: that is busy (exit 8, waited
    for), not 'does the server use TLS?' (exit 3, at once)."""
    crt, key = cert
    daemon = daemon_factory("--max-children", "1", "--tls-cert", str(crt), "--tls-key", str(key))
    context = ssl.create_default_context(cafile=str(crt))
    holder = context.wrap_socket(socket.create_connection(("127.0.0.1", daemon.port)),
                                 server_hostname="127.0.0.1")
    try:
        holder.sendall(Hello().frame())  # past its hello, the one slot stays taken
        seen = b""
        while seen.count(b'"ok":true') < 2:  # the greeting and the hello reply
            chunk = holder.recv(65536)
            assert chunk
            seen += chunk
        r = subprocess.run([*CLI, "ls", "-s", daemon.address, "--tls", "--cafile", str(crt),
                            "--timeout", "1"], env=ENV, capture_output=True, text=True,
                           timeout=60)
    finally:
        holder.close()
    assert r.returncode == 8, r.stderr
    assert "busy" in r.stderr and "gave up after" in r.stderr and "Traceback" not in r.stderr
    ok = subprocess.run([*CLI, "ls", "-s", daemon.address, "--tls", "--cafile", str(crt)],
                        env=ENV, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


# ---------------------------------------------------------------- no space on the client



def test_a_get_that_cannot_fit_fails_before_the_first_byte_naming_the_numbers(daemon,
                                                                              small_tmpfs):
    random_file(daemon.root / "big.bin", 10 * 1024 * 1024)
    r = subprocess.run([*CLI, "get", "-s", daemon.address, "big.bin", str(small_tmpfs)],
                       env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 9, r.stderr
    message = one_line_error(r)
    assert "no space left for" in message and "10.0 MiB (10485760 bytes) more needed" in message
    assert "free in " + str(small_tmpfs) in message and "nothing is kept" in message
    assert list(small_tmpfs.iterdir()) == []  # not a byte written, no partial left


def test_out_of_space_mid_get_keeps_the_partial_says_where_and_resumes(daemon, small_tmpfs):
    src = random_file(daemon.root / "big.bin", 6 * 1024 * 1024)
    dest = small_tmpfs / "big.bin"
    partial = small_tmpfs / ".big.bin.filesrv-part"
    get = start_cli("get", "-s", daemon.address, "--limit-rate", "2M", "big.bin", str(dest))
    try:
        wait_for(lambda: partial.exists() and partial.stat().st_size > 1024 * 1024,
                 what="the download to start")
        filler = os.open(small_tmpfs / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # another writer takes the rest of the space
            for _ in range(1024):
                os.write(filler, b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(filler)
        _, err = get.communicate(timeout=60)
    finally:
        if get.poll() is None:
            get.kill()
            get.wait(timeout=10)
    assert get.returncode == 9, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "no space left for" in err and "more needed" in err and "free in" in err
    assert f"are kept in {partial}" in err and "resume" in err
    held = partial.stat().st_size
    assert held > 0 and not dest.exists()
    (small_tmpfs / "filler").unlink()
    again = subprocess.run([*CLI, "get", "-s", daemon.address, "--json", "big.bin", str(dest)],
                           env=ENV, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["resumed_from"] > 0
    assert xxh128_of(dest) == xxh128_of(src)


# ---------------------------------------------------------------- no traceback from any input

def test_put_r_skips_a_name_that_is_not_utf8_and_sends_the_rest(daemon, tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "ok.txt").write_text("a")
    (tree / "sub" / "c.txt").write_text("c")
    os.mkdir(os.path.join(bytes(tree), b"dir\xfe"))
    with open(os.path.join(bytes(tree), b"bad\xff"), "wb") as fh:
        fh.write(b"b")
    r = subprocess.run([*CLI, "put", "-r", "-s", daemon.address, str(tree)], env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(r.stderr.splitlines()) == [
        "filesrv: skipped bad\\xff: its name is not valid UTF-8, which the protocol needs",
        "filesrv: skipped dir\\xfe: its name is not valid UTF-8, which the protocol needs"]
    assert (daemon.root / "tree" / "ok.txt").read_text() == "a"
    assert (daemon.root / "tree" / "sub" / "c.txt").read_text() == "c"


def test_hash_r_into_a_closed_pipe_ends_quietly_as_coreutils_do(daemon, tmp_path):
    (daemon.root / "many").mkdir()
    for i in range(3000):  # names long enough that even ls -r prints more than a pipe holds
        (daemon.root / "many" / f"a-file-with-a-name-of-forty-chars-{i:05d}").write_text("")
    for command in (["hash", "-r", "many"], ["ls", "-r", "many"]):
        proc = subprocess.Popen([*CLI, *command, "-s", daemon.address], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline()
        proc.stdout.close()  # as `| head -1` does
        err = proc.stderr.read().decode()  # type: ignore[union-attr]
        assert proc.wait(timeout=60) == -signal.SIGPIPE, err
        assert err == ""


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_every_subcommand_fails_on_one_line_with_a_documented_status(daemon, tmp_path):
    """Each error path: one line on stderr, no traceback, an exit status the README lists."""
    (daemon.root / "d").mkdir()
    (daemon.root / "d" / "f.txt").write_text("f")
    (daemon.root / "top.txt").write_text("t")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    s = ["-s", daemon.address]
    refused = ["-s", f"127.0.0.1:{free_port()}"]
    cases = [
        (["put", *s, str(tmp_path / "missing")], 9),
        (["put", *s, "-r", str(tmp_path / "missing")], 9),
        (["put", *s, str(a_file), "../out"], 5),
        (["put", *refused, str(a_file)], 3),
        (["get", *s, "nothing.txt", str(tmp_path / "n")], 4),
        (["get", *s, "top.txt", str(a_file / "under-a-file")], 9),
        (["get", *s, "-r", "d", str(a_file)], 9),
        (["get", *s, "-r", "d", str(a_file / "sub")], 9),
        (["get", *s, "-r", "nothing", str(tmp_path / "n2")], 4),
        (["get", *refused, "top.txt", str(tmp_path / "n3")], 3),
        (["ls", *s, "nothing"], 4),
        (["ls", *s, "../x"], 5),
        (["ls", *refused], 3),
        (["rm", *s, "nothing"], 4),
        (["rm", *s, "d"], 4),
        (["mv", *s, "nothing", "other"], 4),
        (["mkdir", *s, "d"], 4),
        (["mkdir", *s, "no/such/parent"], 4),
        (["hash", *s, "nothing"], 4),
        (["hash", *s, "d"], 4),
        (["hash", *refused, "top.txt"], 3),
        (["ls", "-s", "127.0.0.1:notaport"], 2),
        (["ls", *s, "--token-file", str(tmp_path / "no-token-file")], 2),
    ]
    documented = {int(n) for n in re.findall(r"\b(\d+) [a-z]", readme_exit_statuses())}
    for args, status in cases:
        r = run_cli(*args)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        assert r.returncode == status, (args, r.returncode, r.stderr)
        assert r.returncode in documented, (args, r.returncode)
        if status != 2:  # argparse prints its usage line above the error
            assert len(r.stderr.splitlines()) == 1, (args, r.stderr)
        assert r.stderr.strip(), args


def readme_exit_statuses() -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return text.split("Exit status:", 1)[1].split("\n\n", 1)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reply_then_reset_mid_upload(conn: socket.socket, request: dict[str, Any]) -> None:
    """Accept the put, then, while its bytes flow, send a reply that is not an error
    (as a reply to a request sent ahead would be) and reset the connection."""
    conn.sendall(encode_frame(ok_reply(offset=0)))
    conn.recv(65536)  # the upload is under way
    conn.sendall(encode_frame(ok_reply(count=1)))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_send_cut_after_a_reply_that_is_not_an_error_is_a_connection_failure(
        fake_server, tmp_path):
    """When a send breaks, a reply waiting on the socket is the server's reason only if it
    is an error; any other reply (to a request sent ahead) means the connection was cut:
    exit 3, retried, never 'malformed reply' (exit 11)."""
    server = fake_server(reply_then_reset_mid_upload)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(64 * 1024 * 1024))
    r = subprocess.run([*CLI, "put", "-s", server.address, "--timeout", "10", "--retries",
                        "1", str(source), "big.bin"], env=ENV, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 3, r.stderr
    assert len(server.requests) == 2  # asked again once
    assert "Traceback" not in r.stderr
