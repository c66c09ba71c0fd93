"""A connection to a filesrv daemon: opening it (TLS, authentication, the hello
pipelined with the first request), framed requests and replies, and the one mapping of
what goes wrong between client and server (as httpcore's map_exceptions).

It connects and hands off: the commands and transfers built on it (filesrv.client)
send requests and read replies through it, and retry through its RetryPolicy.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, NoReturn, TypeVar

from .errors import (AuthFailed, BadRequest, Busy, ConfigError, ConnectionFailed,
                     FilesrvError, ProtocolError)
from .protocol import (PROTOCOL_VERSION, Auth, Hello, auth_proof, check_reply, decode_chunk,
                       parse_chunk, parse_hello_reply)
from .defaults import PORT as DEFAULT_PORT
from .retry import DEFAULT_TIMEOUT, RETRIES, Reconnecting, RetryPolicy
from .transport import Channel, PeerClosed, TornFrame, format_address

if TYPE_CHECKING:
    import ssl

_T = TypeVar("_T")


def parse_server(address: str) -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT' or 'HOST' (default port) to (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:
        host, port = address, ""
    if not host:
        raise ValueError(f"no host in {address!r}")
    if ":" in host and not _is_ipv6(host):  # not a name, and not an address either
        raise ValueError(f"bad server address {address!r} (HOST:PORT, or [IPV6]:PORT)")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in {address!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"port out of range in {address!r}")
    return host, number



def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True



class ClosedBeforeGreeting(ConnectionFailed):
    """The server hung up before its greeting: busy (with TLS), or a TLS mismatch."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message, retryable=False)  # connect() already retried it



def _client_tls_context(cafile: str | None) -> "ssl.SSLContext":
    import ssl  # lazily: plain connections should not pay for loading OpenSSL
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA file {cafile}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context



def server_failure(exc: BaseException) -> BaseException:
    """What a failure between the client and the server means, mapped once (as httpcore's
    map_exceptions): a broken, closed or cut connection, a frame torn anywhere, is
    ConnectionFailed, which --retries reconnects and resumes after; a reply that breaks the
    protocol is ProtocolError; the server's own errors, and the rest, stay as they are."""
    if isinstance(exc, PeerClosed):
        return ConnectionFailed("the server closed the connection")
    if isinstance(exc, TornFrame):
        return ConnectionFailed(f"the connection to the server broke ({exc.message})")
    if isinstance(exc, BadRequest) and not exc.from_peer:
        return ProtocolError(f"malformed reply from the server: {exc.message}")
    if isinstance(exc, OSError):
        return ConnectionFailed(f"connection to the server failed: {exc.strerror or exc}")
    return exc



class Session(NamedTuple):
    """What a handshake settled, for a client that tells it (filesrv -v)."""

    address: str  # HOST:PORT as connected to
    server: str  # the server's name and version, from its greeting
    version: int  # the protocol version both speak
    tls: str | None  # the TLS version (e.g. 'TLSv1.3'); None: in the clear
    authenticated: bool  # the server asked for a token and accepted ours


class Connection:
    """One connection to a filesrv daemon, made on first use and again after a cut;
    many commands may run over it."""

    def __init__(self, host: str, port: int = DEFAULT_PORT, *,
                 timeout: float = DEFAULT_TIMEOUT, token: bytes | None = None,
                 tls: bool = False, cafile: str | None = None, retries: int = RETRIES,
                 retry: RetryPolicy | None = None,
                 on_retry: Callable[[Reconnecting], None] | None = None,
                 on_wait: Callable[[str], None] | None = None) -> None:
        """retry: the whole policy (default: `retries` reconnections, and a busy server
        waited for up to `timeout`); on_wait(message) hears, once, that the client is
        waiting for a busy server."""
        self.host = host
        self.port = port
        self.timeout = timeout
        self.token = token
        self.tls = _client_tls_context(cafile) if tls else None
        self.server_agent = ""
        self._channel: Channel | None = None
        self._hello_pending = False
        self._ever_connected = False
        self.retry = retry or RetryPolicy(reconnects=retries, busy_seconds=timeout)
        self.on_retry = on_retry  # told before each reconnect after a cut connection
        self.on_wait = on_wait
        self.on_connect: Callable[[Session], None] | None = None  # after each handshake
        self._said_waiting = False
        self.reconnects = 0  # over this client's life, for summaries
        self.reconnect_seconds = 0.0

    def __enter__(self) -> "Client":
        # no connection yet: the first command connects, and its request travels with
        # the hello instead of waiting a round trip for the greeting
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def connect(self, first_request: bytes | None = None) -> None:
        """Connect and handshake, retrying with backoff while the server is busy.

        first_request goes out right behind the hello when no token is needed; the
        server answers it after the greeting and the hello reply.
        """
        started = time.monotonic()
        for attempt in range(1, 100_000):  # bounded in time by the policy, in count here
            try:
                self._channel = self._open(first_request)
                return
            except Busy as exc:
                waited = time.monotonic() - started
                delay = self.retry.busy_delay(attempt - 1, self.retry.busy_seconds - waited)
                if delay <= 0:
                    raise Busy(f"{exc.message}; gave up after {attempt} attempts in "
                               f"{waited:.0f} s (--timeout sets how long to wait)") from None
                self._say_waiting(exc.message)
            except ClosedBeforeGreeting as exc:
                if attempt >= self.retry.closed_attempts:
                    raise ClosedBeforeGreeting(f"{exc.message} (gave up after {attempt} "
                                                "attempts)") from None
                delay = self.retry.busy_delay(attempt - 1, self.retry.busy_seconds)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _say_waiting(self, why: str) -> None:
        if self.on_wait is not None and not self._said_waiting:
            self._said_waiting = True
            self.on_wait(f"{why}; waiting up to {self.retry.busy_seconds:g} s for a free "
                         "connection slot")

    def _open(self, first_request: bytes | None) -> Channel:
        where = format_address((self.host, self.port))
        self._hello_pending = False
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            # refused right after a cut: the server is restarting; refused at first: a typo
            raise ConnectionFailed(f"cannot connect to {where}: {exc.strerror or exc}",
                                   retryable=self._ever_connected) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            sock = self._start_tls(sock, where)
        channel = Channel(sock)
        try:
            # hello goes out before the greeting is read: a TLS server that gets it in
            # the clear fails its handshake at once instead of waiting for us. Without
            # a token there is nothing to wait for, so the first request rides along.
            pipelined = first_request if self.token is None else None
            channel.send_frame(Hello(agent="filesrv-client").frame() + (pipelined or b""))
            try:
                greeting = parse_hello_reply(channel.read_header())
            except (PeerClosed, ConnectionResetError, BadRequest):
                raise ClosedBeforeGreeting(
                    f"{where} closed the connection before greeting us: it is busy, or it "
                    "expects TLS (try --tls)") from None
            if greeting.version != PROTOCOL_VERSION:
                raise ConnectionFailed(f"server speaks protocol {greeting.version}, this "
                                       f"client {PROTOCOL_VERSION}", retryable=False)
            if greeting.nonce is not None:
                if self.token is None:
                    raise AuthFailed("authentication failed: the server requires a token "
                                     "(--token-file or FILESRV_TOKEN)")
                self._reply(parse_hello_reply, channel)
                self._authenticate(channel, greeting.nonce)
                if first_request is not None:
                    channel.send_bytes(first_request)
            else:
                # the hello reply is read with the first reply: one round trip saved
                self._hello_pending = True
                if first_request is not None and pipelined is None:
                    # we held it back for a token this server does not ask for
                    channel.send_bytes(first_request)
        except OSError as exc:
            channel.close()
            raise ConnectionFailed(f"connection to {where} failed: {exc}") from None
        except BaseException:
            channel.close()
            raise
        self.server_agent = greeting.server
        self._ever_connected = True
        if self.on_connect is not None:
            tls = sock.version() if self.tls is not None else None  # type: ignore[attr-defined]
            self.on_connect(Session(where, greeting.server, greeting.version, tls,
                                    greeting.nonce is not None))
        return channel

    def _start_tls(self, sock: socket.socket, where: str) -> socket.socket:
        import ssl
        assert self.tls is not None
        try:
            return self.tls.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise ConnectionFailed(f"TLS: cannot verify {where}: {exc.verify_message}",
                                   retryable=False) from None
        except (ssl.SSLEOFError, ConnectionResetError):
            sock.close()
            # closed before a word of TLS: how a TLS server at its limit says busy
            # (PROTOCOL.md 1); a plain server would have answered with its greeting
            raise Busy(f"server busy: {where} closed the connection before the TLS "
                       "handshake (as a TLS server at its connection limit does)") from None
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise ConnectionFailed(f"TLS handshake with {where} failed ({exc}): does the "
                                   "server use TLS? (it does only with --tls-cert)",
                                   retryable=False) from None

    def _authenticate(self, channel: Channel, nonce: str) -> None:
        assert self.token is not None
        proof = auth_proof(self.token, nonce)
        channel.send_frame(Auth(proof=proof).frame())
        try:
            self._reply(check_reply, channel)
        except AuthFailed:
            raise AuthFailed("authentication failed: the server refused the token") from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def channel(self) -> Channel:
        if self._channel is None:
            self.connect()
        assert self._channel is not None
        return self._channel

    def _next_header(self, channel: Channel) -> dict[str, Any]:
        if self._hello_pending:
            self._hello_pending = False
            parse_hello_reply(channel.read_header())
        return channel.read_header()

    def _reply(self, parse: Callable[[dict[str, Any]], _T], channel: Channel | None = None
               ) -> _T:
        """The next reply, parsed; its failures mapped by _server_failures."""
        with self._server_failures():
            return parse(self._next_header(channel or self.channel))

    @contextmanager
    def _server_failures(self) -> Iterator[None]:
        """Around reading from the server: failures mapped by server_failure; after a
        broken connection or a broken reply the connection is out of step, and closed."""
        try:
            yield
        except (PeerClosed, BadRequest, OSError) as exc:
            mapped = server_failure(exc)
            if isinstance(mapped, (ConnectionFailed, ProtocolError)):
                self.close()
            if mapped is exc:
                raise
            raise mapped from None

    def _chunks(self, header: dict[str, Any], listing: Any = None
                ) -> Iterator[tuple[list[Any], bool]]:
        """The items of a chunked reply that starts with `header`, a chunk at a time,
        and whether that chunk was the last (a server that does not chunk sends one).
        A listing's last chunk says how many names the server left out: set on
        `listing.names_left_out` when given."""
        while True:
            with self._server_failures():
                chunk = parse_chunk(header)
                items = decode_chunk(self.channel.read_body(chunk.length), chunk.count)
            if listing is not None and not chunk.more:
                listing.names_left_out = chunk.skipped
            yield items, not chunk.more
            if not chunk.more:
                return
            header = self._reply(lambda h: h)

    def _request(self, frame: bytes) -> None:
        """Send the request that starts a command; on a new connection, with the hello."""
        if self._channel is None:
            self.connect(first_request=frame)
        else:
            self._send(frame)

    def _send(self, data: bytes | memoryview) -> None:
        """Send, and on a broken connection report the server's error if it sent one."""
        try:
            self.channel.send_bytes(data)
        except OSError as exc:
            self._raise_pending_error(exc)

    def _raise_pending_error(self, exc: OSError) -> NoReturn:
        channel = self.channel
        try:
            channel.sock.settimeout(2.0)
            header = self._next_header(channel)
        except (OSError, PeerClosed, FilesrvError):
            self.close()
            raise ConnectionFailed(f"connection to the server broke: {exc}") from None
        self.close()
        with self._server_failures():
            check_reply(header)  # an error: the server's reason, raised as itself
        # any other reply answers a request sent ahead: the connection was just cut
        raise ConnectionFailed(f"connection to the server broke: {exc}")

    def _retrying(self, attempt: Callable[[], _T]) -> _T:
        """Run a command's attempt under the retry policy: after a cut connection,
        reconnect and run it again."""
        return self.retry.run(attempt, self._reconnecting)

    def _reconnecting(self, event: Reconnecting) -> None:
        self.close()
        self.reconnects += 1
        if self.on_retry:
            self.on_retry(event)
