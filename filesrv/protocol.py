"""The filesrv wire protocol, sans I/O.

Framing, message construction and validation as pure functions over bytes and
dicts, shared by the server and the client.  Sockets live in `transport`.
docs/PROTOCOL.md is the normative description; this module implements it.

A frame is a 4-byte unsigned big-endian length N followed by N bytes of UTF-8
JSON holding one object (the header).  Some headers announce a body of raw
bytes that follows the frame immediately: a `data` request, the ok replies to
`get` and `ls`, a `get_files` file frame and each chunk of a chunked reply;
their `length` field gives the body's size.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, NoReturn

from .errors import BadPath, BadRequest, FilesrvError, VersionMismatch, error_from_code

PROTOCOL_VERSION = 1
MAX_HEADER_SIZE = 64 * 1024
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_TAG_CHARS = 256
MAX_BATCH_FILES = 1024  # entries in one put_files / get_files request
MAX_JSON_DEPTH = 32  # nesting of arrays and objects in a header; the deepest message has 3
CHUNK_BYTES = 64 * 1024  # a chunked reply sends a chunk as soon as its body holds this much
SKIP_IDENTICAL = "identical"  # put_files: keep a remote file with the same size and digest
SKIP_EXISTING = "existing"    # put_files: keep any remote file of that name (--no-clobber)
RESERVED_NAME = ".filesrv"  # the server's own state directory at the top of the root

_PREFIX = struct.Struct(">I")
PREFIX_SIZE = _PREFIX.size
_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
_NONCE_RE = re.compile(r"[0-9a-f]{64}")
_JSON_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
AUTH_METHOD = "hmac-sha256"
_AUTH_CONTEXT = b"filesrv-auth-v1:"


# ---------------------------------------------------------------- framing

def encode_frame(header: Mapping[str, Any]) -> bytes:
    """One frame: length prefix and compact UTF-8 JSON."""
    try:  # strict JSON (RFC 8259): no NaN or Infinity
        payload = json.dumps(header, separators=(",", ":"), ensure_ascii=False,
                             allow_nan=False).encode()
    except ValueError as exc:
        raise BadRequest(f"header cannot be sent as JSON: {exc}") from None
    if len(payload) > MAX_HEADER_SIZE:
        raise BadRequest(f"header of {len(payload)} bytes exceeds {MAX_HEADER_SIZE}")
    return _PREFIX.pack(len(payload)) + payload


def parse_length_prefix(prefix: bytes) -> int:
    """Header length from the 4-byte prefix, refused before anything is allocated."""
    (length,) = _PREFIX.unpack(prefix)
    if length > MAX_HEADER_SIZE:
        raise BadRequest(f"header of {length} bytes exceeds the limit of {MAX_HEADER_SIZE}")
    return length


def decode_header(payload: bytes) -> dict[str, Any]:
    """A header's JSON object: strict RFC 8259, nested at most MAX_JSON_DEPTH deep."""
    try:
        text = payload.decode("utf-8")
        _check_depth(text)
        header = json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest("header is not a JSON object")
    return header


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def _check_depth(text: str) -> None:
    """ValueError if arrays and objects nest deeper than MAX_JSON_DEPTH.

    Checked before parsing, so a deep frame never reaches the recursive parser
    (whose RecursionError is no ValueError). Brackets inside strings do not count.
    """
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return  # the common case: too few brackets to nest that deep
    brackets = _NOT_BRACKET_RE.sub("", _JSON_STRING_RE.sub("", text))
    depth = 0
    for char in brackets:
        depth += 1 if char in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")


class FrameBuffer:
    """Incremental decoder: feed received bytes, take headers and body bytes out.

    Bodies are not parsed: after a header that announces a body, the caller
    takes exactly that many bytes with `take_body` (and reads the rest of the
    body straight from the socket, so large bodies are never buffered here).
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_header(self) -> dict[str, Any] | None:
        """The next complete header, or None when more bytes are needed."""
        if len(self._buf) < PREFIX_SIZE:
            return None
        length = parse_length_prefix(bytes(self._buf[:PREFIX_SIZE]))
        end = PREFIX_SIZE + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[PREFIX_SIZE:end])
        del self._buf[:end]
        return decode_header(payload)

    def take_body(self, limit: int) -> bytes:
        """Up to `limit` already-buffered body bytes."""
        chunk = bytes(self._buf[:limit])
        del self._buf[:limit]
        return chunk


# ---------------------------------------------------------------- field checks

def _field(header: Mapping[str, Any], key: str, kind: type | tuple[type, ...],
           *, optional: bool = False) -> Any:
    if key not in header or (optional and header[key] is None):
        if optional:
            return None
        raise BadRequest(f"missing field {key!r}")
    value = header[key]
    # bool is an int in Python but never a valid integer field on the wire
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise BadRequest(f"field {key!r} has the wrong type")
    return value


def _count(header: Mapping[str, Any], key: str) -> int:
    value = _field(header, key, int)
    if value < 0 or value >= 2**63:
        raise BadRequest(f"field {key!r} out of range")
    return value


def _tag(header: Mapping[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = _field(header, key, str, optional=optional)
    if value is not None and len(value) > MAX_TAG_CHARS:
        raise BadRequest(f"field {key!r} is longer than {MAX_TAG_CHARS} characters")
    return value


def _digest(header: Mapping[str, Any], key: str) -> str:
    value = _field(header, key, str)
    if not _DIGEST_RE.fullmatch(value):
        raise BadRequest(f"field {key!r} is not 32 lowercase hex digits")
    return value


def _flag(header: Mapping[str, Any], key: str) -> bool:
    """An optional boolean field (absent or null: false)."""
    return bool(_field(header, key, bool, optional=True))


def _path(header: Mapping[str, Any], key: str = "path") -> str:
    value = _field(header, key, str)
    parse_path(value, allow_root=True)  # syntax only; the op decides about the root
    return value


# ---------------------------------------------------------------- paths

def parse_path(path: str, *, allow_root: bool = False) -> tuple[str, ...]:
    """Components of a remote path, refusing anything that is not plainly inside the root.

    Rules: "/" separates components; one leading "/" is allowed and means the
    root; a trailing "/" is allowed only where the root (a directory) may be
    named; no empty component ("a//b"), no "." or "..", no NUL, no component
    over 255 UTF-8 bytes, no ".filesrv" as the first component.
    """
    if "\x00" in path:
        raise BadPath("path contains a NUL byte")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise BadPath(f"path is longer than {MAX_PATH_BYTES} bytes")
    body = path[1:] if path.startswith("/") else path
    if allow_root and body.endswith("/"):
        body = body[:-1]
    if body == "":
        if not allow_root:
            raise BadPath("path names the root, not a file")
        return ()
    parts = tuple(body.split("/"))
    for part in parts:
        if part == "":
            raise BadPath(f"empty path component in {path!r}")
        if part in (".", ".."):
            raise BadPath(f"{part!r} is not allowed in a path")
        try:
            encoded = part.encode("utf-8")
        except UnicodeEncodeError:
            raise BadPath("path is not valid UTF-8") from None
        if len(encoded) > MAX_NAME_BYTES:
            raise BadPath(f"path component longer than {MAX_NAME_BYTES} bytes")
    if parts[0] == RESERVED_NAME:
        raise BadPath(f"{RESERVED_NAME!r} is reserved for the server")
    return parts


def normalize_path(path: str) -> str:
    """Root-relative form without a leading '/', as reported in --json output."""
    return "/".join(parse_path(path, allow_root=True))


# ---------------------------------------------------------------- requests

class Request:
    """A request message: `op` plus the fields named in `__slots__`, in wire order."""

    __slots__: tuple[str, ...] = ()
    op = ""

    def _set(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self, name, value)

    def header(self) -> dict[str, Any]:
        return {"op": self.op, **{name: getattr(self, name) for name in self.__slots__}}

    def frame(self) -> bytes:
        return encode_frame(self.header())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.header() == self.header()  # type: ignore

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Hello(Request):
    __slots__ = ("version", "agent")
    op = "hello"

    def __init__(self, version: int = PROTOCOL_VERSION, agent: str = "filesrv") -> None:
        self._set(version=version, agent=agent)


class Auth(Request):
    __slots__ = ("proof",)
    op = "auth"

    def __init__(self, proof: str | None = None) -> None:  # None: the client has no token
        self._set(proof=proof)


class ListDir(Request):
    """`chunked`: the client reads a chunked reply (§1), so the listing streams."""

    __slots__ = ("path", "recursive", "chunked")
    op = "ls"

    def __init__(self, path: str = "", recursive: bool = False, chunked: bool = False) -> None:
        self._set(path=path, recursive=recursive, chunked=chunked)


class Stat(Request):
    __slots__ = ("path",)
    op = "stat"

    def __init__(self, path: str) -> None:
        self._set(path=path)


class Remove(Request):
    __slots__ = ("path", "recursive")
    op = "rm"

    def __init__(self, path: str, recursive: bool = False) -> None:
        self._set(path=path, recursive=recursive)


class Move(Request):
    __slots__ = ("src", "dst")
    op = "mv"

    def __init__(self, src: str, dst: str) -> None:
        self._set(src=src, dst=dst)


class MakeDir(Request):
    __slots__ = ("path", "parents")
    op = "mkdir"

    def __init__(self, path: str, parents: bool = False) -> None:
        self._set(path=path, parents=parents)


class Get(Request):
    __slots__ = ("path", "offset", "if_match")
    op = "get"

    def __init__(self, path: str, offset: int = 0, if_match: str | None = None) -> None:
        self._set(path=path, offset=offset, if_match=if_match)


class Put(Request):
    __slots__ = ("path", "size", "source")
    op = "put"

    def __init__(self, path: str, size: int, source: str) -> None:
        self._set(path=path, size=size, source=source)


class Data(Request):
    __slots__ = ("length",)
    op = "data"

    def __init__(self, length: int) -> None:
        self._set(length=length)


class Commit(Request):
    __slots__ = ("xxh128",)
    op = "commit"

    def __init__(self, xxh128: str) -> None:
        self._set(xxh128=xxh128)


class PutFiles(Request):
    """Many small files in one exchange: (path, size, xxh128) for each.

    `chunked`: the client reads the failures as a chunked reply (§1), however many.
    """

    __slots__ = ("files", "skip", "chunked")
    op = "put_files"

    def __init__(self, files: list[dict[str, Any]], skip: str = SKIP_IDENTICAL,
                 chunked: bool = False) -> None:
        self._set(files=files, skip=skip, chunked=chunked)


class GetFiles(Request):
    """Many files in one exchange; an entry's xxh128 is the copy the client already has."""

    __slots__ = ("files",)
    op = "get_files"

    def __init__(self, files: list[dict[str, Any]]) -> None:
        self._set(files=files)


def _batch(h: Mapping[str, Any], *, check_paths: bool = True) -> list[Mapping[str, Any]]:
    """The `files` of a batch; with check_paths a path §4 refuses refuses the batch
    (put_files), without it the server refuses that entry alone (get_files)."""
    files = _field(h, "files", list)
    if not 1 <= len(files) <= MAX_BATCH_FILES:
        raise BadRequest(f"'files' must hold 1 to {MAX_BATCH_FILES} entries")
    for entry in files:
        if not isinstance(entry, dict):
            raise BadRequest("a 'files' entry is not an object")
        path = _field(entry, "path", str)
        if check_paths:
            parse_path(path)  # a file: never the root
    return files


def _parse_put_files(h: Mapping[str, Any]) -> PutFiles:
    files = [{"path": e["path"], "size": _count(e, "size"), "xxh128": _digest(e, "xxh128")}
             for e in _batch(h)]
    skip = _field(h, "skip", str)
    if skip not in (SKIP_IDENTICAL, SKIP_EXISTING):
        raise BadRequest(f"field 'skip' must be {SKIP_IDENTICAL!r} or {SKIP_EXISTING!r}")
    return PutFiles(files, skip, chunked=_flag(h, "chunked"))


def _parse_get_files(h: Mapping[str, Any]) -> GetFiles:
    files = []
    for e in _batch(h, check_paths=False):
        have = e.get("xxh128")
        files.append({"path": e["path"], "xxh128": None if have is None else _digest(e, "xxh128")})
    return GetFiles(files)


def _parse_hello(h: Mapping[str, Any]) -> Hello:
    version = _count(h, "version")
    agent = _tag(h, "agent", optional=True) or ""
    return Hello(version=version, agent=agent)


def _parse_get(h: Mapping[str, Any]) -> Get:
    return Get(path=_path(h), offset=_count(h, "offset"),
               if_match=_tag(h, "if_match", optional=True))


def _parse_put(h: Mapping[str, Any]) -> Put:
    return Put(path=_path(h), size=_count(h, "size"), source=_tag(h, "source") or "")


def _parse_auth(h: Mapping[str, Any]) -> Auth:
    proof = _field(h, "proof", str, optional=True)
    if proof is not None and not _NONCE_RE.fullmatch(proof):
        raise BadRequest("field 'proof' is not 64 lowercase hex digits")
    return Auth(proof=proof)


_PARSERS = {
    "hello": _parse_hello,
    "auth": _parse_auth,
    "ls": lambda h: ListDir(path=_path(h), recursive=_flag(h, "recursive"),
                            chunked=_flag(h, "chunked")),
    "stat": lambda h: Stat(path=_path(h)),
    "rm": lambda h: Remove(path=_path(h), recursive=_flag(h, "recursive")),
    "mv": lambda h: Move(src=_path(h, "src"), dst=_path(h, "dst")),
    "mkdir": lambda h: MakeDir(path=_path(h), parents=_flag(h, "parents")),
    "get": _parse_get,
    "put": _parse_put,
    "data": lambda h: Data(length=_count(h, "length")),
    "commit": lambda h: Commit(xxh128=_digest(h, "xxh128")),
    "put_files": _parse_put_files,
    "get_files": _parse_get_files,
}


def parse_request(header: Mapping[str, Any]) -> Request:
    """Validate a request header completely; raises BadRequest or BadPath."""
    op = _field(header, "op", str)
    parser = _PARSERS.get(op)
    if parser is None:
        raise BadRequest(f"unknown op {op!r}")
    return parser(header)


def check_version(hello: Hello) -> None:
    if hello.version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"protocol version {hello.version} is not supported (server speaks {PROTOCOL_VERSION})")


# ---------------------------------------------------------------- replies

def error_reply(error: FilesrvError) -> dict[str, Any]:
    return {"ok": False, "code": error.code, "message": error.message}


def ok_reply(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def check_reply(header: Mapping[str, Any]) -> Mapping[str, Any]:
    """The header of an ok reply; an error reply is raised as its FilesrvError."""
    ok = _field(header, "ok", bool)
    if not ok:
        code = _field(header, "code", str)
        message = _field(header, "message", str)
        raise error_from_code(code, message)
    return header


class HelloReply(NamedTuple):
    version: int
    server: str
    nonce: str | None = None  # set when the server requires authentication


class GetReply(NamedTuple):
    size: int
    offset: int
    length: int
    etag: str
    xxh128: str


class PutReply(NamedTuple):
    offset: int


class CommitReply(NamedTuple):
    size: int
    xxh128: str


class StatReply(NamedTuple):
    type: str  # "file" or "dir"
    size: int
    mtime: float
    xxh128: str | None  # files only


def parse_hello_reply(header: Mapping[str, Any]) -> HelloReply:
    h = check_reply(header)
    auth = _field(h, "auth", dict, optional=True)
    nonce = None
    if auth is not None:
        if _field(auth, "method", str) != AUTH_METHOD:
            raise BadRequest(f"unsupported authentication method {auth.get('method')!r}")
        nonce = _field(auth, "nonce", str)
        if not _NONCE_RE.fullmatch(nonce):
            raise BadRequest("auth nonce is not 64 lowercase hex digits")
    return HelloReply(version=_count(h, "version"), server=_tag(h, "server") or "",
                      nonce=nonce)


def greeting(server: str, nonce: str | None) -> dict[str, Any]:
    """The server's first frame; `nonce` (64 hex digits) when a token is required."""
    auth = {"method": AUTH_METHOD, "nonce": nonce} if nonce else None
    return ok_reply(version=PROTOCOL_VERSION, server=server, auth=auth)


def auth_proof(token: bytes, nonce: str) -> str:
    """HMAC-SHA256 over the server's nonce: proves the token without sending it."""
    import hashlib  # lazily: most connections never authenticate, and start-up counts
    import hmac
    return hmac.new(token, _AUTH_CONTEXT + bytes.fromhex(nonce), hashlib.sha256).hexdigest()


def proof_matches(tokens: list[bytes], nonce: str, proof: str | None) -> bool:
    """Constant-time check against every token (no early exit that would leak which)."""
    import hmac
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(auth_proof(token, nonce), proof or "")
    return matched and proof is not None


def parse_get_reply(header: Mapping[str, Any]) -> GetReply:
    h = check_reply(header)
    reply = GetReply(size=_count(h, "size"), offset=_count(h, "offset"),
                     length=_count(h, "length"), etag=_tag(h, "etag") or "",
                     xxh128=_digest(h, "xxh128"))
    if reply.offset + reply.length != reply.size:
        raise BadRequest("get reply: offset + length != size")
    return reply


def parse_put_reply(header: Mapping[str, Any]) -> PutReply:
    return PutReply(offset=_count(check_reply(header), "offset"))


def parse_commit_reply(header: Mapping[str, Any]) -> CommitReply:
    h = check_reply(header)
    return CommitReply(size=_count(h, "size"), xxh128=_digest(h, "xxh128"))


def parse_stat_reply(header: Mapping[str, Any]) -> StatReply:
    h = check_reply(header)
    kind = _field(h, "type", str)
    if kind not in ("file", "dir"):
        raise BadRequest(f"stat reply has unknown type {kind!r}")
    digest = _digest(h, "xxh128") if kind == "file" else None
    return StatReply(kind, _count(h, "size"), float(_field(h, "mtime", (int, float))), digest)


class FileReply(NamedTuple):
    """One file of a get_files reply; `length` body bytes follow (0 when unchanged)."""

    size: int
    xxh128: str
    length: int


def parse_file_reply(header: Mapping[str, Any]) -> FileReply:
    h = check_reply(header)
    reply = FileReply(size=_count(h, "size"), xxh128=_digest(h, "xxh128"),
                      length=_count(h, "length"))
    if reply.length not in (0, reply.size):
        raise BadRequest("get_files reply: length is neither 0 nor the size")
    return reply


def parse_need_reply(header: Mapping[str, Any], count: int) -> list[int]:
    """put_files: the indices of the files the server wants, ascending."""
    need = _field(check_reply(header), "need", list)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in need) or \
            need != sorted(set(need)) or (need and not 0 <= need[0] <= need[-1] < count):
        raise BadRequest("put_files reply: 'need' is not ascending indices of the request")
    return need


def parse_placed_reply(header: Mapping[str, Any], count: int) -> dict[int, FilesrvError]:
    """put_files: the files (by index) that could not be placed, with their errors."""
    return dict(parse_failure(item, count)
                for item in _field(check_reply(header), "failed", list))


def placed_reply(failures: list[dict[str, Any]]) -> dict[str, Any]:
    """put_files' last reply for a client that did not ask for chunks: every failure,
    its index and code always, its message shortened (or emptied) if that is what it
    takes to fit the header limit."""
    for budget in (None, 256, 64, 16, 0):
        header = ok_reply(failed=[{**f, "message": f["message"][:budget]}
                                  for f in failures] if budget is not None else failures)
        if len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
               ) <= MAX_HEADER_SIZE:
            return header
    raise AssertionError("1,024 failures without messages always fit a header")


def parse_failure(item: Any, count: int) -> tuple[int, FilesrvError]:
    """One `failed` entry of a put_files reply: the file's index and its error."""
    if not isinstance(item, dict):
        raise BadRequest("put_files reply: a 'failed' entry is not an object")
    index = _count(item, "index")
    if index >= count:
        raise BadRequest("put_files reply: 'failed' index out of range")
    return index, error_from_code(_field(item, "code", str), _field(item, "message", str))


def parse_removed_reply(header: Mapping[str, Any]) -> int:
    return _count(check_reply(header), "removed")


# ---------------------------------------------------------------- chunked replies

class Chunk(NamedTuple):
    """One frame of a chunked reply: `length` body bytes (a JSON array of `count`
    items) follow; `more` says whether another chunk comes after it."""

    length: int
    count: int
    more: bool
    skipped: int = 0  # a listing's last chunk: names left out (not UTF-8, §4)


def encode_chunks(items: Iterable[Any],
                  final: Callable[[], Mapping[str, Any]] | None = None) -> Iterator[bytes]:
    """The frames of a chunked reply, each with its body, the last with more=false
    (and the fields `final()` returns once the items are all out).

    A chunk leaves as soon as its body holds CHUNK_BYTES, so the sender holds one
    chunk, never the whole array. No items: one empty chunk.
    """
    encoded: list[bytes] = []
    size = 0
    for item in items:
        if size >= CHUNK_BYTES:  # and another item follows: this chunk is not the last
            yield _chunk_frame(encoded, more=True)
            encoded, size = [], 0
        encoded.append(json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode())
        size += len(encoded[-1]) + 1
    yield _chunk_frame(encoded, more=False, **(final() if final else {}))


def _chunk_frame(encoded: list[bytes], *, more: bool, **fields: Any) -> bytes:
    body = b"[" + b",".join(encoded) + b"]"
    return encode_frame(ok_reply(length=len(body), count=len(encoded), more=more, **fields)
                        ) + body


def parse_chunk(header: Mapping[str, Any]) -> Chunk:
    """A chunk's header; an error reply raises. A reply without `more` (a server that
    does not chunk, or an ls without `chunked`) is a single, last chunk."""
    h = check_reply(header)
    more = _field(h, "more", bool, optional=True)
    skipped = _count(h, "skipped") if h.get("skipped") is not None else 0
    return Chunk(length=_count(h, "length"), count=_count(h, "count"), more=bool(more),
                 skipped=skipped)


def decode_chunk(body: bytes, count: int) -> list[Any]:
    """The items of a chunk's body: a JSON array of `count` values."""
    try:
        items = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("chunk body is not UTF-8 JSON") from None
    if not isinstance(items, list) or len(items) != count:
        raise BadRequest(f"chunk body is not a JSON array of {count} items")
    return items


# ---------------------------------------------------------------- listings

class Listing(list["Entry"]):
    """The entries of an `ls` reply, and how many names the server left out of them
    (not UTF-8, PROTOCOL.md §4): the user is told, never silently shown less."""

    names_left_out: int = 0


class Entry(NamedTuple):
    name: str
    type: str  # "file" or "dir"
    size: int
    mtime: float

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


def encode_array(items: Iterable[Any]) -> Iterator[bytes]:
    """A JSON array as compact UTF-8, a piece per item: the whole never in memory."""
    yield b"["
    for i, item in enumerate(items):
        yield (b"," if i else b"") + json.dumps(item, separators=(",", ":"),
                                                ensure_ascii=False).encode()
    yield b"]"


def encode_listing(entries: list[Entry]) -> bytes:
    return json.dumps([e.as_dict() for e in entries], separators=(",", ":"),
                      ensure_ascii=False).encode()


def decode_listing(body: bytes) -> list[Entry]:
    try:
        items = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("listing body is not UTF-8 JSON") from None
    if not isinstance(items, list):
        raise BadRequest("listing body is not a JSON array")
    return [parse_entry(item) for item in items]


def parse_entry(item: Any) -> Entry:
    """One entry of a listing, checked."""
    if not isinstance(item, dict):
        raise BadRequest("listing entry is not an object")
    kind = _field(item, "type", str)
    if kind not in ("file", "dir"):
        raise BadRequest(f"listing entry has unknown type {kind!r}")
    mtime = _field(item, "mtime", (int, float))
    return Entry(name=_field(item, "name", str), type=kind, size=_count(item, "size"),
                 mtime=float(mtime))
