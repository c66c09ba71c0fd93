"""filesrv's benchmark: ceilings, filesrv and its peers side by side in one run.

    python3 bench/run.py            # full run (needs ~12 GiB free disk; 8 GiB memory check)
    python3 bench/run.py --quick    # fewer repetitions, no 8 GiB file
    python3 bench/run.py --trees-only   # 2,000 small files: put -r/get -r vs scp -r, rsync

Contenders of one scenario run alternately, in a rotating order, and the table
shows medians.  Every row is a whole client process timed from start to exit
(except the small-file rows, which time a loop inside this process, as a
script using the Python API would).  Peers whose tools are missing are skipped
with a note: `apt-get install nginx-light curl` and `pip install pyftpdlib`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import ceiling  # noqa: E402
from filesrv.client import Client  # noqa: E402
from filesrv.protocol import Get, Hello, decode_header, parse_length_prefix  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
_SCRIPT = Path(sys.executable).parent / "filesrv"  # the command users run, if installed
FILESRV = [str(_SCRIPT)] if _SCRIPT.exists() else [PY, "-m", "filesrv"]
TIME = shutil.which("time") or "/usr/bin/time"  # GNU time: apt-get install time


@dataclass
class Sample:
    seconds: float
    cpu: float = 0.0
    rss_kb: int = 0
    server_rss_kb: int = 0


@dataclass
class Row:
    scenario: str
    name: str
    samples: list[Sample] = field(default_factory=list)
    amount: float = 0.0        # bytes (bulk) or files (small)
    unit: str = "MB/s"

    @property
    def seconds(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def rate(self) -> float:
        scale = 1e6 if self.unit == "MB/s" else 1.0
        return self.amount / self.seconds / scale if self.amount else 0.0


# ------------------------------------------------------------------ processes

def hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run(cmd: list[str], watch_children_of: int | None = None, cwd: str | None = None) -> Sample:
    """Run to completion: wall seconds, CPU seconds, peak RSS, and the server child's peak."""
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for child in children(watch_children_of or 0):
                peak[0] = max(peak[0], hwm_kb(child))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    if watch_children_of:
        watcher.start()
    # GNU time reports the command's own peak RSS (wait4 here would count this
    # process's pages inherited across the fork, before the exec)
    stats = tempfile.NamedTemporaryFile(prefix="bench-time-", delete=False)
    stats.close()
    started = time.perf_counter()
    proc = subprocess.run([TIME, "-q", "-f", "%U %S %M", "-o", stats.name, *cmd], env=ENV,
                          cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - started
    done.set()
    if watch_children_of:
        watcher.join()
    user, system, rss = Path(stats.name).read_text().split()[-3:]
    os.unlink(stats.name)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace')}")
    return Sample(seconds, float(user) + float(system), int(rss), peak[0])


class Servers:
    """Every server of the run, stopped by PID at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], port_from: Callable[[subprocess.Popen], int],
              **kw) -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen(cmd, env=ENV, **kw)
        self.procs.append(proc)
        return proc, port_from(proc)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_port_file(path: Path, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return int(path.read_text())
        time.sleep(0.02)
    raise RuntimeError(f"no port in {path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def make_file(path: Path, size: int, block: bytes | None = None) -> Path:
    block = block or os.urandom(64 * MiB)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n
    return path


def settle() -> None:
    """Flush dirty pages between runs so one run's writeback does not bill the next."""
    os.sync()


def remove(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def etag_of(port: int, path: str, size: int) -> str:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(Hello().frame() + Get(path=path, offset=size).frame())
        buf = b""
        headers = []
        while len(headers) < 3:
            buf += sock.recv(65536)
            while len(buf) >= 4:
                n = parse_length_prefix(buf[:4])
                if len(buf) < 4 + n:
                    break
                headers.append(decode_header(buf[4:4 + n]))
                buf = buf[4 + n:]
        return headers[2]["etag"]


# ------------------------------------------------------------------ the run

def alternate(rows: list[Row], runners: list[Callable[[], Sample]], reps: int,
              cleanup: Callable[[], None]) -> None:
    for rep in range(reps):
        order = list(range(len(rows)))
        order = order[rep % len(order):] + order[: rep % len(order)]
        for i in order:
            settle()
            rows[i].samples.append(runners[i]())
            cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 repetitions, no 8 GiB file")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 7, quick 2)")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new temp dir)")
    ap.add_argument("--out", default=None, help="also write the report (markdown) here")
    ap.add_argument("--trees-only", action="store_true",
                    help="only the 2,000-small-files tree scenario (scp -r, rsync, filesrv -r)")
    args = ap.parse_args()
    reps = args.reps or (2 if args.quick else 7)
    # as after `pip install`: bytecode compiled once, not at every start
    subprocess.run([PY, "-m", "compileall", "-q", str(REPO / "filesrv")], check=True)
    work = Path(tempfile.mkdtemp(prefix="filesrv-bench-", dir=args.dir))
    servers = Servers(work)
    try:
        report = (bench_trees(work, servers, reps) if args.trees_only
                  else bench(work, servers, reps, args.quick) + bench_trees(work, servers, reps))
    finally:
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


def bench(work: Path, servers: Servers, reps: int, quick: bool) -> str:
    src, srv, out = work / "src", work / "srv", work / "out"
    for d in (src, srv, out, work / "nginx", work / "ftp", work / "small"):
        d.mkdir()
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"preparing files in {work}")
    block = os.urandom(64 * MiB)
    big = make_file(src / "big.bin", GiB, block)
    make_file(src / "c256.bin", 256 * MiB, block[::-1])
    (src / "empty.bin").write_bytes(b"")
    for name in ("big.bin", "c256.bin", "empty.bin"):
        for d in (srv, work / "nginx", work / "ftp"):
            os.link(src / name, d / name)
    n_small = 2000
    for i in range(n_small):
        data = os.urandom(4096)
        (work / "small" / f"f{i:04d}").write_bytes(data)
        (srv / f"f{i:04d}").write_bytes(data)
    settle()

    # servers
    d_proc, d_port = servers.start(
        [*FILESRV, "serve", "--root", str(srv), "--port", "0"],
        lambda p: int(p.stdout.readline().split(b"listening on 127.0.0.1:")[1].split()[0]),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    addr = f"127.0.0.1:{d_port}"
    _, bulk_port = servers.start(
        [PY, str(REPO / "bench" / "ceiling.py"), "bulk-server", str(work / "bulk.port"),
         str(big), str(work / "ceiling-up.bin")],
        lambda p: wait_port_file(work / "bulk.port"))
    _, small_port = servers.start(
        [PY, str(REPO / "bench" / "ceiling.py"), "small-server", str(work / "small.port"),
         str(work / "small")], lambda p: wait_port_file(work / "small.port"))
    peers = start_peers(work, servers, log)
    # warm the digest cache, as for any file served twice
    run([*FILESRV, "get", "-s", addr, "big.bin", str(out / "warm.bin")])
    run([*FILESRV, "get", "-s", addr, "c256.bin", str(out / "warm2.bin")])
    remove(out / "warm.bin", out / "warm2.bin")

    rows: list[Row] = []

    # 1. bulk download and upload
    log("bulk get, 1 GiB")
    down = [Row("get 1 GiB", "ceiling: bare socket"), Row("get 1 GiB", "filesrv get")]
    down_run = [lambda: run([PY, str(REPO / "bench" / "ceiling.py"), "bulk-get",
                             str(bulk_port), str(out / "dl.bin")]),
                lambda: run([*FILESRV, "get", "-s", addr, "--no-progress", "big.bin",
                             str(out / "dl.bin")], watch_children_of=d_proc.pid)]
    for name, url in peers.get("get", []):
        down.append(Row("get 1 GiB", name))
        down_run.append(lambda url=url: run(["curl", "-fsS", "-o", str(out / "dl.bin"), url]))
    alternate(down, down_run, reps, lambda: remove(out / "dl.bin"))
    rows += down

    log("bulk put, 1 GiB")
    up = [Row("put 1 GiB", "ceiling: bare socket"), Row("put 1 GiB", "filesrv put"),
          Row("put 1 GiB", "ceiling + fsync (what durability costs; not a goal)")]
    up_run = [lambda: run([PY, str(REPO / "bench" / "ceiling.py"), "bulk-put",
                           str(bulk_port), str(big)]),
              lambda: run([*FILESRV, "put", "-s", addr, "--no-progress", str(big), "up.bin"],
                          watch_children_of=d_proc.pid),
              lambda: run([PY, str(REPO / "bench" / "ceiling.py"), "bulk-put-fsync",
                           str(bulk_port), str(big)])]
    for name, url in peers.get("put", []):
        up.append(Row("put 1 GiB", name))
        up_run.append(lambda url=url: run(["curl", "-fsS", "-T", str(big), url]))
    alternate(up, up_run, reps, lambda: remove(work / "ceiling-up.bin", srv / "up.bin",
                                               work / "nginx" / "up.bin",
                                               work / "ftp" / "up.bin"))
    rows += up
    for r in down + up:
        r.amount = GiB

    # 2. small files
    log("small files, 4 KiB")
    kept_n, new_n = n_small, 500
    small = [Row("4 KiB gets, one connection", "ceiling: bare ForkingTCPServer", unit="files/s"),
             Row("4 KiB gets, one connection", "filesrv Client API", unit="files/s"),
             Row("4 KiB gets, new connection each", "ceiling: bare ForkingTCPServer",
                 unit="files/s"),
             Row("4 KiB gets, new connection each", "filesrv Client API", unit="files/s")]
    small[0].amount = small[1].amount = kept_n
    small[2].amount = small[3].amount = new_n

    def timed(fn: Callable[[], None]) -> Sample:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return Sample(time.perf_counter() - t0, time.process_time() - c0)

    def ceiling_kept() -> None:
        with socket.create_connection(("127.0.0.1", small_port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(kept_n):
                ceiling.small_get(sock, f"f{i:04d}", str(out / f"f{i:04d}"))

    def filesrv_kept() -> None:
        with Client("127.0.0.1", d_port) as client:
            for i in range(kept_n):
                client.get(f"f{i:04d}", str(out / f"f{i:04d}"))

    def ceiling_new() -> None:
        for i in range(new_n):
            with socket.create_connection(("127.0.0.1", small_port)) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                ceiling.small_get(sock, f"f{i:04d}", str(out / f"f{i:04d}"))

    def filesrv_new() -> None:
        for i in range(new_n):
            with Client("127.0.0.1", d_port) as client:
                client.get(f"f{i:04d}", str(out / f"f{i:04d}"))

    def clear_out() -> None:
        for p in out.iterdir():
            p.unlink()

    alternate(small, [lambda: timed(ceiling_kept), lambda: timed(filesrv_kept),
                      lambda: timed(ceiling_new), lambda: timed(filesrv_new)], reps, clear_out)
    rows += small

    # 3. start-up
    log("start-up")
    start = [Row("start-up", "python3 -c 'import socket'", unit="s"),
             Row("start-up", "filesrv get of an empty file", unit="s")]
    alternate(start, [lambda: run([PY, "-c", "import socket"]),
                      lambda: run([*FILESRV, "get", "-s", addr, "--no-progress", "empty.bin",
                                   str(out / "empty.bin")])],
              max(reps * 4, 10), lambda: remove(out / "empty.bin"))
    rows += start

    # 4. 16 concurrent clients
    log("16 concurrent gets of 256 MiB")
    conc = [Row("16 x get 256 MiB at once", "filesrv get x16 (aggregate)"),
            Row("16 x get 256 MiB at once", "bare socket x16 (aggregate; not a goal)")]
    for r in conc:
        r.amount = 16 * 256 * MiB

    def sixteen(make_cmd: Callable[[int], list[str]]) -> Sample:
        t0 = time.perf_counter()
        procs = [subprocess.Popen(make_cmd(i), env=ENV) for i in range(16)]
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError("a concurrent get failed")
        return Sample(time.perf_counter() - t0)

    # the bare server sends big.bin: 16 x 256 MiB of it, cut off by the client reading it
    alternate(conc, [lambda: sixteen(lambda i: [*FILESRV, "get", "-s", addr, "--no-progress",
                                                "c256.bin", str(out / f"c{i}.bin")]),
                     lambda: sixteen(lambda i: [PY, str(REPO / "bench" / "ceiling.py"),
                                                "bulk-get-n", str(bulk_port),
                                                str(out / f"c{i}.bin"), str(256 * MiB)])],
              reps, clear_out)
    rows += conc

    # 5. resume at 50 % and put over an existing file
    log("resume and replace")
    size = big.stat().st_size
    etag = etag_of(d_port, "big.bin", size)

    def resumed_get() -> Sample:
        with open(big, "rb") as fh, open(out / ".res.bin.filesrv-part", "wb") as part:
            part.write(fh.read(size // 2))
        (out / ".res.bin.filesrv-part.json").write_text(
            json.dumps({"remote": "big.bin", "etag": etag, "size": size}))
        settle()
        return run([*FILESRV, "get", "-s", addr, "--no-progress", "big.bin", str(out / "res.bin")])

    res = [Row("resume get at 50 %", "filesrv get, full"),
           Row("resume get at 50 %", "filesrv get, resumed at 50 %")]
    alternate(res, [lambda: run([*FILESRV, "get", "-s", addr, "--no-progress", "big.bin",
                                 str(out / "res.bin")]), resumed_get], reps, clear_out)
    rows += res

    def put_over() -> Sample:
        shutil.copyfile(big, srv / "over.bin")
        settle()
        return run([*FILESRV, "put", "-s", addr, "--no-progress", str(big), "over.bin"])

    over = [Row("put 1 GiB, replacing", "filesrv put, new name"),
            Row("put 1 GiB, replacing", "filesrv put over an existing 1 GiB file")]
    alternate(over, [lambda: run([*FILESRV, "put", "-s", addr, "--no-progress", str(big),
                                  "fresh.bin"]), put_over], reps,
              lambda: remove(srv / "fresh.bin", srv / "over.bin"))
    for r in res + over:
        r.amount = GiB
    rows += over

    # 6. memory at 8 GiB
    mem: list[Row] = []
    if not quick:
        log("memory: 8 GiB get and put")
        huge = make_file(src / "huge.bin", 8 * GiB, block)
        os.link(huge, srv / "huge.bin")
        settle()
        g = Row("8 GiB", "filesrv get 8 GiB")
        g.samples.append(run([*FILESRV, "get", "-s", addr, "--no-progress", "huge.bin",
                              str(out / "huge.bin")], watch_children_of=d_proc.pid))
        remove(out / "huge.bin")
        settle()
        p = Row("8 GiB", "filesrv put 8 GiB")
        p.samples.append(run([*FILESRV, "put", "-s", addr, "--no-progress", str(huge),
                              "huge-up.bin"], watch_children_of=d_proc.pid))
        remove(srv / "huge-up.bin", srv / "huge.bin", huge)
        g.amount = p.amount = 8 * GiB
        mem = [g, p]
        rows += mem

    return render(rows, down, up, small, start, conc[0], res, over, mem, reps)


def bench_trees(work: Path, servers: Servers, reps: int) -> str:
    """2,000 files of 4 KiB in nested directories: put -r and get -r against scp -r and rsync."""
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log("trees: 2,000 x 4 KiB, nested")
    base = work / "trees"
    src, srv = base / "src", base / "srv"
    for i in range(2000):
        d = src / f"d{i % 20}" / f"e{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.bin").write_bytes(os.urandom(4096))
    srv.mkdir()
    _, port = servers.start([*FILESRV, "serve", "--root", str(srv), "--port", "0"],
                            lambda p: int(p.stdout.readline().split(b"listening on 127.0.0.1:")[1]
                                          .split()[0]),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    addr = f"127.0.0.1:{port}"
    run([*FILESRV, "put", "-r", "-s", addr, str(src), "seed"])  # what the gets fetch
    # Every run writes a tree of its own and nothing is deleted until the series is over:
    # this ext4 has no journal, and then allocating an inode skips every inode deleted in
    # the last 60 s (360 s while its inode table block is dirty: recently_deleted() in
    # fs/ext4/ialloc.c), one buffer lookup each. Deleting a 2,000-file tree made the next
    # contender's creations 10-50x slower: whoever ran next paid for the previous cleanup.
    fresh = iter(range(10**6))
    ups = [("filesrv put -r", lambda: run([*FILESRV, "put", "-r", "-s", addr, "--no-progress",
                                          str(src), f"up-{next(fresh)}"]))]
    downs = [("filesrv get -r", lambda: run([*FILESRV, "get", "-r", "-s", addr,
                                            "--no-progress", "seed",
                                            str(base / f"dl-{next(fresh)}")]))]
    peers_note = []
    scp = start_sshd(base, servers)
    if scp:
        shutil.copytree(src, base / "ssh-seed")
        ups.append(("scp -r", lambda: run([*scp, str(src),
                                           f"root@127.0.0.1:{base}/up-{next(fresh)}"])))
        downs.append(("scp -r", lambda: run([*scp, f"root@127.0.0.1:{base}/ssh-seed",
                                             str(base / f"dl-{next(fresh)}")])))
    else:
        peers_note.append("scp -r skipped (needs openssh-server and openssh-client)")
    if shutil.which("rsync"):
        (base / "rsyncd.conf").write_text(
            f"use chroot = no\npid file = {base}/rsyncd.pid\n[files]\n    path = {base}\n"
            "    read only = no\n    uid = root\n    gid = root\n")
        rport = free_port()
        servers.start(["rsync", "--daemon", "--no-detach", f"--config={base}/rsyncd.conf",
                       f"--port={rport}", "--address=127.0.0.1"], lambda p: rport)
        wait_listening(rport)
        url = f"rsync://127.0.0.1:{rport}/files"
        ups.append(("rsync -r (daemon)", lambda: run(["rsync", "-r", f"{src}/",
                                                      f"{url}/up-{next(fresh)}/"])))
        if "--fsync" in subprocess.run(["rsync", "--help"], capture_output=True,
                                       text=True).stdout:
            # like for like: filesrv flushes every upload before it acknowledges it
            ups.append(("rsync -r --fsync (daemon)", lambda: run(
                ["rsync", "-r", "--fsync", f"{src}/", f"{url}/up-{next(fresh)}/"])))
        downs.append(("rsync -r (daemon)", lambda: run(["rsync", "-r", f"{url}/src/",
                                                        f"{base}/dl-{next(fresh)}/"])))
    else:
        peers_note.append("rsync skipped (needs rsync)")
    up_rows = [Row("put a 2,000-file tree", name, unit="files/s") for name, _ in ups]
    down_rows = [Row("get a 2,000-file tree", name, unit="files/s") for name, _ in downs]
    for r in up_rows + down_rows:
        r.amount = 2000
    os.sync()  # and out of the window of whatever was deleted before this scenario
    time.sleep(61)
    alternate(up_rows, [fn for _, fn in ups], reps, lambda: None)
    alternate(down_rows, [fn for _, fn in downs], reps, lambda: None)
    lines = ["", "| tree scenario | contender | files/s | median s | speed relative to filesrv |",
             "|---|---|---|---|---|"]
    goals = []
    for rows in (up_rows, down_rows):
        ours = rows[0]
        for r in rows:
            log(f"{r.scenario}, {r.name}: " + " ".join(f"{x.seconds:.3f}" for x in r.samples))
            lines.append(f"| {r.scenario} | {r.name} | {r.rate:,.0f} | {r.seconds:.3f} | "
                         f"{ours.seconds / r.seconds:.2f}x |")
        for r in rows[1:]:
            speedup = r.seconds / ours.seconds
            if "--fsync" in r.name:  # not a goal: what durability costs the peer
                goals.append(f"- {r.scenario}: filesrv vs {r.name}: {speedup:.2f}x faster "
                             "(both flush every file; no goal)")
                continue
            need = 3.0 if r.name.startswith("scp") else 1.0
            goals.append(f"- {r.scenario}: filesrv vs {r.name}: **{speedup:.2f}x** faster "
                         f"(need >= {need:g}) — {'met' if speedup >= need else 'NOT met'}")
    return "\n".join(lines + ["", "Tree goals:", *goals, *(f"- {n}" for n in peers_note), ""])


def start_sshd(base: Path, servers: Servers) -> list[str] | None:
    """An sshd on a free loopback port with throwaway keys, for scp; None if not installed."""
    sshd, scp = shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("scp")
    if not (os.path.exists(sshd) and scp and shutil.which("ssh-keygen")):
        return None
    keys = base / "ssh"
    keys.mkdir()
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)],
                       check=True)
    shutil.copy(keys / "user.pub", keys / "authorized_keys")
    port = free_port()
    (keys / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys}/host\n"
        f"AuthorizedKeysFile {keys}/authorized_keys\nPasswordAuthentication no\n"
        f"PermitRootLogin prohibit-password\nPidFile {keys}/sshd.pid\nStrictModes no\n"
        "UsePAM no\nSubsystem sftp internal-sftp\n")
    os.makedirs("/run/sshd", exist_ok=True)
    servers.start([sshd, "-D", "-f", str(keys / "sshd_config"), "-E", str(keys / "sshd.log")],
                  lambda p: port)
    wait_listening(port)
    return [scp, "-q", "-r", "-P", str(port), "-i", str(keys / "user"),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]


def start_peers(work: Path, servers: Servers, log) -> dict[str, list[tuple[str, str]]]:
    peers: dict[str, list[tuple[str, str]]] = {"get": [], "put": []}
    if shutil.which("curl") and shutil.which("nginx"):
        port = free_port()
        conf = work / "nginx.conf"
        conf.write_text(f"""
user root; worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{}}
http {{
  access_log off; sendfile on; tcp_nopush on; client_max_body_size 0;
  client_body_temp_path {work}/nginx-tmp;
  server {{ listen 127.0.0.1:{port}; root {work}/nginx;
           location / {{ dav_methods PUT; create_full_put_path on; }} }}
}}
""")
        servers.start(["nginx", "-c", str(conf)], lambda p: port)
        wait_listening(port)
        peers["get"].append(("nginx + curl", f"http://127.0.0.1:{port}/big.bin"))
        peers["put"].append(("nginx + curl (WebDAV PUT)", f"http://127.0.0.1:{port}/up.bin"))
    else:
        log("nginx or curl missing: skipping the nginx peer")
    try:
        import pyftpdlib  # noqa: F401
        have_ftp = shutil.which("curl") is not None
    except ImportError:
        have_ftp = False
    if have_ftp:
        port = free_port()
        servers.start([PY, "-m", "pyftpdlib", "-i", "127.0.0.1", "-p", str(port), "-w", "-d",
                       str(work / "ftp")], lambda p: port, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
        wait_listening(port)
        peers["get"].append(("pyftpdlib + curl", f"ftp://127.0.0.1:{port}/big.bin"))
        peers["put"].append(("pyftpdlib + curl", f"ftp://127.0.0.1:{port}/up.bin"))
    else:
        log("pyftpdlib or curl missing: skipping the FTP peer")
    return peers


def render(rows, down, up, small, start, conc, res, over, mem, reps) -> str:
    machine = f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {os.uname().release}"
    lines = [f"filesrv benchmark, {time.strftime('%Y-%m-%d %H:%M')} UTC, {machine}, "
             f"medians of {reps} alternating runs", "",
             "| scenario | contender | rate | median s | client CPU s/GiB | client peak RSS MiB "
             "| server child peak RSS MiB | ratio to ceiling |",
             "|---|---|---|---|---|---|---|---|"]
    ceilings = {"get 1 GiB": down[0].rate, "put 1 GiB": up[0].rate,
                "4 KiB gets, one connection": small[0].rate,
                "4 KiB gets, new connection each": small[2].rate,
                "16 x get 256 MiB at once": down[0].rate}
    for r in rows:
        med = lambda f, r=r: statistics.median(f(s) for s in r.samples)  # noqa: E731
        cpu = med(lambda s: s.cpu) / (r.amount / GiB) if r.unit == "MB/s" and r.amount else None
        rate = f"{r.rate:,.0f} {r.unit}" if r.unit != "s" else "-"
        ceil = ceilings.get(r.scenario)
        ratio = f"{r.rate / ceil:.2f}x" if ceil and r.unit != "s" else "-"
        rss = med(lambda s: s.rss_kb) / 1024
        srss = med(lambda s: s.server_rss_kb) / 1024
        lines.append(f"| {r.scenario} | {r.name} | {rate} | {r.seconds:.3f} | "
                     f"{'-' if cpu is None else f'{cpu:.2f}'} | {rss:.0f} | "
                     f"{'-' if not srss else f'{srss:.0f}'} | {ratio} |")

    def goal(text: str, value: float, ok: bool) -> str:
        return f"- {text}: **{value:.2f}** — {'met' if ok else 'NOT met'}"

    g = [goal("1. get 1 GiB / ceiling (need >= 0.9)", down[1].rate / down[0].rate,
              down[1].rate >= 0.9 * down[0].rate),
         goal("1. put 1 GiB / ceiling (need >= 0.9)", up[1].rate / up[0].rate,
              up[1].rate >= 0.9 * up[0].rate),
         goal("2. 4 KiB, one connection / ceiling (need >= 0.7)", small[1].rate / small[0].rate,
              small[1].rate >= 0.7 * small[0].rate),
         goal("2. 4 KiB, new connections / ceiling (need >= 0.85)",
              small[3].rate / small[2].rate, small[3].rate >= 0.85 * small[2].rate),
         goal("3. start-up / python3 -c 'import socket' (need <= 1.6)",
              start[1].seconds / start[0].seconds, start[1].seconds <= 1.6 * start[0].seconds)]
    peak = max([max(s.rss_kb, s.server_rss_kb) for r in [down[1], up[1], *mem]
                for s in r.samples]) / 1024
    g.append(goal("4. peak RSS MiB, client and server child, 1 GiB"
                  + (" and 8 GiB" if mem else " (8 GiB skipped: --quick)")
                  + " (need < 64)", peak, peak < 64))
    g.append(goal("5. 16 x 256 MiB aggregate / single-stream ceiling (need >= 0.8)",
                  conc.rate / down[0].rate, conc.rate >= 0.8 * down[0].rate))
    g.append(goal("6. resumed-at-50 % get / full get (need <= 0.6)",
                  res[1].seconds / res[0].seconds, res[1].seconds <= 0.6 * res[0].seconds))
    g.append(goal("6. put over an existing file / put to a new name (need <= 1.1)",
                  over[1].seconds / over[0].seconds, over[1].seconds <= 1.1 * over[0].seconds))
    return "\n".join(lines + ["", "Goals:", *g, ""])


if __name__ == "__main__":
    sys.exit(main())
