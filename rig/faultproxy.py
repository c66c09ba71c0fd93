"""A TCP relay that makes a link bad on purpose: latency, a bandwidth cap, stalls, cuts.

This kernel has no netem, so the rig puts this between clients and the server.
Standard library only; one thread per direction of each connection.

    python3 faultproxy.py --listen 0.0.0.0:9000 --upstream server:8750 \\
        --latency-ms 20 --rate 20M --stall-every 8M --stall-seconds 2 \\
        --cut-after 4M --cut-connections 2

--cut-after B cuts (RST) each of the first --cut-connections connections once B
bytes have passed through it, so a retrying client gets through eventually.
On start it prints "faultproxy listening on HOST:PORT".
"""

from __future__ import annotations

import argparse
import itertools
import socket
import struct
import sys
import threading
import time

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
CHUNK = 64 * 1024


def size(text: str) -> int:
    text = text.strip().upper()
    unit = text[-1] if text and text[-1] in "KMG" else ""
    return int(float(text[:-1] if unit else text) * _UNITS[unit])


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class Faults:
    def __init__(self, args: argparse.Namespace) -> None:
        self.latency = args.latency_ms / 1000.0
        self.rate = args.rate
        self.stall_every = args.stall_every
        self.stall_seconds = args.stall_seconds
        self.cut_after = args.cut_after
        self.cut_connections = args.cut_connections
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def connection_number(self) -> int:
        with self._lock:
            return next(self._numbers)


class Link:
    """One client connection and its upstream twin; faults apply to both directions."""

    def __init__(self, client: socket.socket, upstream: socket.socket, faults: Faults,
                 number: int) -> None:
        self.client, self.upstream, self.faults = client, upstream, faults
        self.cut_due = faults.cut_after if number <= faults.cut_connections else 0
        self.moved = 0
        self.lock = threading.Lock()
        self.closed = threading.Event()

    def run(self) -> None:
        for src, dst in ((self.client, self.upstream), (self.upstream, self.client)):
            threading.Thread(target=self.pump, args=(src, dst), daemon=True).start()

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        started = time.monotonic()
        sent = 0
        next_stall = self.faults.stall_every
        try:
            while not self.closed.is_set():
                data = src.recv(CHUNK)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if self.faults.latency:
                    time.sleep(self.faults.latency)
                if self.faults.rate:  # keep the average at or below the cap
                    ahead = (sent + len(data)) / self.faults.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                sent += len(data)
                if self.faults.stall_every and sent >= next_stall:
                    time.sleep(self.faults.stall_seconds)
                    next_stall += self.faults.stall_every
                dst.sendall(data)
                if self.count(len(data)):
                    self.cut()
                    return
        except OSError:
            self.cut()

    def count(self, n: int) -> bool:
        with self.lock:
            self.moved += n
            return bool(self.cut_due) and self.moved >= self.cut_due

    def cut(self) -> None:
        """Abort both sides with a reset, as a broken link would."""
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # shutdown first: it wakes the other direction's thread out of recv(),
                # which would otherwise keep the socket (and the reset) from happening
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def serve(args: argparse.Namespace) -> None:
    faults = Faults(args)
    listener = socket.create_server(address(args.listen), reuse_port=False)
    host, port = listener.getsockname()[:2]
    print(f"faultproxy listening on {host}:{port}", flush=True)
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(address(args.upstream), timeout=10)
            upstream.settimeout(None)
        except OSError as exc:
            print(f"faultproxy: upstream {args.upstream}: {exc}", file=sys.stderr, flush=True)
            client.close()
            continue
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        Link(client, upstream, faults, faults.connection_number()).run()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the real server")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="delay per chunk, each way")
    ap.add_argument("--rate", type=size, default=0, help="bytes/s cap per direction (K/M/G)")
    ap.add_argument("--stall-every", type=size, default=0, help="pause after every N bytes")
    ap.add_argument("--stall-seconds", type=float, default=0.0, help="length of each pause")
    ap.add_argument("--cut-after", type=size, default=0, help="reset a connection after N bytes")
    ap.add_argument("--cut-connections", type=int, default=0,
                    help="how many connections (the first ones) get cut")
    serve(ap.parse_args(argv))


if __name__ == "__main__":
    main()
