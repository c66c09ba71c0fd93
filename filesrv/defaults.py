"""Defaults of the daemon, the client and the command line, each set once here."""

from __future__ import annotations

PORT = 8750
HOST = "127.0.0.1"  # where `filesrv serve` listens, and where a client looks
SERVER = f"{HOST}:{PORT}"
BUFFER_SIZE = 1024 * 1024  # receive and hash buffer, at both ends

# the daemon
ROOT = "./storage"
MAX_CHILDREN = 64
IDLE_TIMEOUT = 300.0  # seconds a connection may stay silent
HANDSHAKE_TIMEOUT = 10.0  # seconds for TLS, hello and authentication
GRACE = 30.0  # seconds transfers in flight may finish after SIGTERM
PARTIAL_MAX_AGE = 7 * 24 * 3600.0  # seconds an unfinished upload is kept

# the client
TIMEOUT = 60.0  # seconds before giving up on a silent or busy server
RETRIES = 5  # reconnect-and-resume attempts after a connection is cut
