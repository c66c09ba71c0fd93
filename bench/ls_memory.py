"""Peak memory of the daemon's child while it lists a huge tree (`ls -r`).

    python3 bench/ls_memory.py                      # 1,000,000 entries, chunked listing
    python3 bench/ls_memory.py --entries 200000     # a smaller tree
    python3 bench/ls_memory.py --unchunked          # as a client of protocol 1.0 asks

The tree (directories of 999 hard links to one file each: cheap to build, no data) is
built once under --work and kept for the next run; remove it with --clean. The
daemon is started on a free loopback port; one client lists the root recursively,
counting the entries as they arrive; before the connection closes, the peak resident
set of the child serving it (VmHWM in /proc/PID/status) is read and compared with
the ceiling (64 MiB). Exit status 1 when it is over.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from filesrv.client import Client  # noqa: E402
from filesrv.protocol import ListDir, PREFIX_SIZE, decode_header, parse_length_prefix  # noqa: E402

CEILING_MIB = 64
PER_DIR = 1000  # entries of each directory, itself included


def build_tree(work: Path, entries: int) -> Path:
    """root/dNNNNN/fNNNN, hard links to one file per directory: `entries` in all
    (directories included); reused when present."""
    root = work / f"tree-{entries}"
    done = root.parent / f"{root.name}.built"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    made, d = 0, 0
    while made < entries:
        directory = root / f"d{d:05d}"
        directory.mkdir()
        made += 1
        seed = directory / "f0000"  # its own seed: a file has at most 65,000 links
        for i in range(min(PER_DIR - 1, entries - made)):
            if i:
                os.link(seed, directory / f"f{i:04d}")
            else:
                seed.write_bytes(b"x")
            made += 1
        d += 1
    done.write_text(str(entries))
    return root


def child_of(pid: int) -> int:
    """The one child of the daemon (the connection being served)."""
    children = [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    assert len(children) == 1, f"expected one child of the daemon, found {children}"
    return children[0]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/PID/status")


def list_chunked(client: Client, daemon_pid: int) -> tuple[int, float]:
    """Entries counted as they arrive, and the child's peak RSS before the last one."""
    count, peak = 0, 0.0
    entries = client.iter_ls("", recursive=True)
    for _ in entries:
        count += 1
        if count == 1:
            child = child_of(daemon_pid)
        if count % 100_000 == 0:
            peak = max(peak, peak_rss_mib(child))
    return count, max(peak, peak_rss_mib(child)) if count else 0.0


def list_unchunked(port: int, daemon_pid: int) -> tuple[int, float]:
    """ls as a protocol 1.0 client asks for it: one body with the whole listing."""
    import json
    import socket
    from filesrv.protocol import Hello, encode_frame
    sock = socket.create_connection(("127.0.0.1", port))
    buf = b""

    def read(n: int) -> bytes:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise EOFError("the daemon closed the connection")
            buf += chunk
        data, buf = buf[:n], buf[n:]
        return data

    def header() -> dict:
        return decode_header(read(parse_length_prefix(read(PREFIX_SIZE))))

    sock.sendall(Hello().frame() + encode_frame({"op": "ls", "path": "", "recursive": True}))
    header(), header()
    reply = header()
    child = child_of(daemon_pid)
    count = len(json.loads(read(reply["length"])))
    peak = peak_rss_mib(child)
    sock.close()
    return count, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/filesrv-ls-memory"))
    parser.add_argument("--unchunked", action="store_true",
                        help="ask as a protocol 1.0 client does (one body)")
    parser.add_argument("--clean", action="store_true", help="remove the tree and exit")
    args = parser.parse_args()
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    root = build_tree(args.work, args.entries)
    print(f"tree: {args.entries:,} entries under {root} "
          f"(ready in {time.monotonic() - started:.1f} s)", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "filesrv", "serve", "--root", str(root), "--host", "127.0.0.1",
         "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        assert daemon.stdout is not None
        line = daemon.stdout.readline()
        port = int(line.split("listening on 127.0.0.1:")[1].split()[0])
        started = time.monotonic()
        if args.unchunked:
            count, peak = list_unchunked(port, daemon.pid)
        else:
            with Client("127.0.0.1", port) as client:
                count, peak = list_chunked(client, daemon.pid)
        seconds = time.monotonic() - started
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    how = "unchunked (protocol 1.0 client)" if args.unchunked else "chunked"
    verdict = "under" if peak < CEILING_MIB else "OVER"
    print(f"ls -r, {how}: {count:,} entries in {seconds:.1f} s; peak RSS of the serving "
          f"child {peak:.1f} MiB, {verdict} the {CEILING_MIB} MiB ceiling")
    return 0 if peak < CEILING_MIB and count == args.entries else 1


if __name__ == "__main__":
    sys.exit(main())
