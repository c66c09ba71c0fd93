"""Error types with stable machine-readable codes.

Every failure that crosses the wire or reaches the user is a `FilesrvError`
subclass.  Its `code` is the protocol's error code (docs/PROTOCOL.md) and its
`exit_status` is what the CLI exits with; both are defined here and nowhere else.
"""

from __future__ import annotations


class FilesrvError(Exception):
    """Base of every expected failure; `code` is stable and machine-readable."""

    code = "error"
    exit_status = 1
    from_peer = False  # set on errors the peer sent (error_from_code), not found here

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.replace("_", " "))

    @property
    def message(self) -> str:
        return str(self.args[0])


class BadRequest(FilesrvError):
    """The peer sent a malformed frame or a message that breaks the protocol."""

    code = "bad_request"
    exit_status = 5


class VersionMismatch(FilesrvError):
    code = "version"
    exit_status = 5


class BadPath(FilesrvError):
    """A path that is malformed or would leave the served root."""

    code = "bad_path"
    exit_status = 5


class BadRange(FilesrvError):
    """A resume offset beyond the end of the file."""

    code = "bad_range"
    exit_status = 5


class NotFound(FilesrvError):
    code = "not_found"
    exit_status = 4


class IsADirectory(FilesrvError):
    code = "is_a_directory"
    exit_status = 4


class AlreadyExists(FilesrvError):
    code = "exists"
    exit_status = 4


class NotADirectory(FilesrvError):
    code = "not_a_directory"
    exit_status = 4


class Busy(FilesrvError):
    """The server is at its connection limit, or a lock is held by a live transfer."""

    code = "busy"
    exit_status = 8


class Superseded(FilesrvError):
    """A newer connection took over this upload's partial file."""

    code = "superseded"
    exit_status = 8


class IntegrityError(FilesrvError):
    """The XXH3-128 digest of the received bytes did not match."""

    code = "integrity"
    exit_status = 6


class NoSpace(FilesrvError):
    code = "no_space"
    exit_status = 7


class IoError(FilesrvError):
    code = "io_error"
    exit_status = 7


class AuthFailed(FilesrvError):
    """No token, or a wrong one, for a server that requires one."""

    code = "auth"
    exit_status = 10


class ReadOnly(FilesrvError):
    code = "read_only"
    exit_status = 5


class TooLarge(FilesrvError):
    """A put larger than the server's --max-file-size."""

    code = "too_large"
    exit_status = 5


class ConfigError(FilesrvError):
    """Bad daemon or client configuration (unreadable token file, bad certificate)."""

    code = "config"
    exit_status = 2


class ConnectionFailed(FilesrvError):
    """Client side only: the server could not be reached or the connection broke."""

    code = "connection"
    exit_status = 3

    def __init__(self, message: str = "", *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable  # worth reconnecting and resuming


class ProtocolError(FilesrvError):
    """Client side only: the server's reply broke the protocol (a malformed frame, a
    field of the wrong type, a body that is not what its header said)."""

    code = "protocol"
    exit_status = 11


class LocalError(FilesrvError):
    """Client side only: a local file could not be read or written."""

    code = "local"
    exit_status = 9


class SourceChanged(FilesrvError):
    """Client side only: a local file kept changing while it was read for an upload
    (it was read again once); nothing took its remote name."""

    code = "source_changed"
    exit_status = 12


class NamesLeftOut(FilesrvError):
    """Client side only: a tree download finished without the server's names that are
    not UTF-8 (the protocol cannot carry them, PROTOCOL.md §4); everything else arrived."""

    code = "names_left_out"
    exit_status = 13


class LocalNoSpace(LocalError):
    """Client side only: the local filesystem has no room for a download."""

    code = "local_no_space"


class ServerError(FilesrvError):
    """An unexpected failure inside the server (a bug); the connection is closed."""

    code = "internal"
    exit_status = 1


# What each exit status of the CLI means: `filesrv --help` prints this table, and a test
# holds it, the error types' statuses and the README's list to the same numbers.
EXIT_STATUSES: dict[int, str] = {
    0: "ok", 1: "other failure", 2: "usage or configuration", 3: "connection",
    4: "not found or wrong type", 5: "refused request, path, size or read-only",
    6: "integrity", 7: "no space or I/O error on the server", 8: "busy",
    9: "local file error", 10: "authentication failed",
    11: "malformed reply from the server", 12: "source changed during transfer",
    13: "get -r left out server names that are not UTF-8", 130: "interrupted",
}


ERRORS_BY_CODE: dict[str, type[FilesrvError]] = {
    cls.code: cls
    for cls in (
        BadRequest, VersionMismatch, BadPath, BadRange, NotFound, IsADirectory,
        NotADirectory, Busy, Superseded, IntegrityError, NoSpace, IoError, ServerError,
        AuthFailed, ReadOnly, TooLarge, AlreadyExists,
    )
}


def error_from_code(code: str, message: str) -> FilesrvError:
    """The exception for an error received from the peer (unknown codes stay generic)."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        err = FilesrvError(f"{message} ({code})")
        err.code = code
    else:
        err = cls(message)
    err.from_peer = True
    return err
