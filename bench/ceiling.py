"""The ceilings filesrv is measured against, as plain as Python gets.

Bulk: a bare socket server that sendfile()s one file to any client that sends
b"G", and stores what a client sends after b"P" + 8-byte length (recv_into a
1 MiB buffer, write), acknowledging with b"K".  No framing, no checks, no
digest, no fsync.

Small files: a bare ForkingTCPServer with filesrv's framing (4-byte length +
JSON header) and no validation: {"path": P} -> {"length": N} + sendfile.

    ceiling.py bulk-server PORT_FILE SERVE_FILE STORE_FILE
    ceiling.py bulk-get PORT OUT_FILE
    ceiling.py bulk-get-n PORT OUT_FILE LIMIT   (only the first LIMIT bytes)
    ceiling.py bulk-put PORT IN_FILE
    ceiling.py bulk-put-fsync PORT IN_FILE   (the receiver fsyncs before acknowledging)
    ceiling.py small-server PORT_FILE ROOT
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import sys
import threading

BUFFER = 1024 * 1024


def _listen() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    return sock


def _announce(port_file: str, port: int) -> None:
    tmp = port_file + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(str(port))
    os.replace(tmp, port_file)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def bulk_server(port_file: str, serve_file: str, store_file: str) -> None:
    listener = _listen()
    _announce(port_file, listener.getsockname()[1])
    while True:
        conn, _ = listener.accept()
        # a thread per connection, so that concurrent clients measure the machine
        threading.Thread(target=_bulk_connection, args=(conn, serve_file, store_file),
                         daemon=True).start()


def _bulk_connection(conn: socket.socket, serve_file: str, store_file: str) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    op = conn.recv(1)
    if op == b"G":
        with open(serve_file, "rb") as fh:
            try:
                conn.sendfile(fh)
            except OSError:  # bulk-get-n hangs up once it has its share
                pass
    elif op in (b"P", b"F"):  # F: as P, then fsync before acknowledging
        (remaining,) = struct.unpack(">Q", _recv_exactly(conn, 8))
        fd = os.open(store_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        while remaining:
            got = conn.recv_into(view[: min(BUFFER, remaining)])
            if not got:
                break
            os.write(fd, view[:got])
            remaining -= got
        if op == b"F":
            os.fsync(fd)
        os.close(fd)
        conn.sendall(b"K")
    conn.close()


def bulk_get(port: int, out_file: str) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"G")
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    while got := sock.recv_into(view):
        os.write(fd, view[:got])
    os.close(fd)


def bulk_get_n(port: int, out_file: str, limit: int) -> None:
    """Like bulk_get, but only the first `limit` bytes (for concurrent runs)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"G")
    view = memoryview(bytearray(BUFFER))
    fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    while limit and (got := sock.recv_into(view[: min(BUFFER, limit)])):
        os.write(fd, view[:got])
        limit -= got
    os.close(fd)
    sock.close()


def bulk_put(port: int, in_file: str, fsync: bool = False) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    size = os.path.getsize(in_file)
    sock.sendall((b"F" if fsync else b"P") + struct.pack(">Q", size))
    with open(in_file, "rb") as fh:
        sock.sendfile(fh)
    assert sock.recv(1) == b"K"


class _SmallHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        root = self.server.root  # type: ignore[attr-defined]
        while True:
            try:
                (n,) = struct.unpack(">I", _recv_exactly(sock, 4))
                path = json.loads(_recv_exactly(sock, n))["path"]
            except EOFError:
                return
            with open(os.path.join(root, path), "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                header = json.dumps({"length": size}).encode()
                sock.sendall(struct.pack(">I", len(header)) + header)
                sock.sendfile(fh)


class SmallServer(socketserver.ForkingTCPServer):
    allow_reuse_address = True
    request_queue_size = 128


def small_server(port_file: str, root: str) -> None:
    server = SmallServer(("127.0.0.1", 0), _SmallHandler)
    server.root = root  # type: ignore[attr-defined]
    _announce(port_file, server.server_address[1])
    server.serve_forever()


def small_get(sock: socket.socket, path: str, out_file: str) -> None:
    """The ceiling client's side of one small get: request, receive, write the file."""
    header = json.dumps({"path": path}).encode()
    sock.sendall(struct.pack(">I", len(header)) + header)
    (n,) = struct.unpack(">I", _recv_exactly(sock, 4))
    length = json.loads(_recv_exactly(sock, n))["length"]
    body = _recv_exactly(sock, length)
    with open(out_file, "wb") as fh:
        fh.write(body)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "bulk-server":
        bulk_server(*args)
    elif command == "bulk-get":
        bulk_get(int(args[0]), args[1])
    elif command == "bulk-get-n":
        bulk_get_n(int(args[0]), args[1], int(args[2]))
    elif command == "bulk-put":
        bulk_put(int(args[0]), args[1])
    elif command == "bulk-put-fsync":
        bulk_put(int(args[0]), args[1], fsync=True)
    elif command == "small-server":
        small_server(*args)
    else:
        sys.exit(f"unknown command {command}")
