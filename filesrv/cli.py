"""The `filesrv` command: argparse, progress bars, output, and exit statuses.

Errors are mapped to a one-line message and an exit status here, once.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import textwrap
import time
from typing import Any, Callable, Iterator, NamedTuple, NoReturn, Sequence

from . import __version__, defaults
from .errors import (EXIT_STATUSES, AlreadyExists, ConfigError, FilesrvError, IsADirectory,
                     LocalError, NamesLeftOut, NotADirectory, NotFound)

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_BUFFER_SIZE_TEXT = f"{defaults.BUFFER_SIZE // _UNITS['M']}M"  # as --buffer-size takes it

EPILOG = """\
Run `filesrv help COMMAND` (or `filesrv COMMAND --help`) for a command's options and
examples.

examples:
  filesrv serve                        serve ./storage on 127.0.0.1:8750
  filesrv put big.iso isos/            upload to isos/big.iso (on 127.0.0.1:8750)
  export FILESRV_SERVER=fileserver:8750
  filesrv get isos/big.iso /tmp/       download to /tmp/big.iso
  filesrv ls -l isos
  filesrv mkdir -p isos/old && filesrv mv isos/big.iso isos/old
  filesrv hash -r isos > SUMS          then: cd isos && xxh128sum -c ../SUMS
  filesrv rm -rf isos/old

An interrupted put or get resumes when you run the same command again. Every
transfer is verified end to end with XXH3-128 (the digest `xxh128sum` prints).

Every option but -r can also come from a FILESRV_* variable (--buffer-size:
FILESRV_BUFFER_SIZE; flags take 1/0, true/false) and from a TOML file: serve's
--config, and the client's ~/.config/filesrv/config.toml, whose [remote.NAME]
sections name servers for -s NAME. The command line wins, then the environment,
then the file.

""" + textwrap.fill("exit status: " + ", ".join(
    f"{status} {meaning}" for status, meaning in EXIT_STATUSES.items()) + ".", width=80) + "\n"

SERVE_EXAMPLES = """\
  filesrv serve                        serve ./storage on 127.0.0.1:8750 until Ctrl-C
  filesrv serve --root /srv/files --host 0.0.0.0 --token-file /etc/filesrv/tokens
  filesrv serve --config /etc/filesrv/filesrv.toml
"""
PUT_EXAMPLES = """\
  filesrv put big.iso                  upload to big.iso at the top of the root
  filesrv put big.iso isos             into the existing directory isos (isos/big.iso)
  filesrv put -r photos backup/photos  a whole tree; a re-run moves only what is missing
"""
GET_EXAMPLES = """\
  filesrv get isos/big.iso             download to ./big.iso
  filesrv get isos/a.iso isos/b.iso /tmp/
  filesrv get -r backup/photos photos  a whole tree; a re-run moves only what is missing
"""
LS_EXAMPLES = """\
  filesrv ls                           the top of the root
  filesrv ls -lr isos                  the whole tree, with sizes and times
  filesrv ls --json isos | jq -r '.[].name'
"""
RM_EXAMPLES = """\
  filesrv rm isos/old.iso
  filesrv rm -rf isos/old              a whole tree; no error if it is already gone
"""
MV_EXAMPLES = """\
  filesrv mv isos/a.iso isos/b.iso     rename
  filesrv mv isos/a.iso old            into the existing directory old (old/a.iso)
"""
MKDIR_EXAMPLES = """\
  filesrv mkdir isos
  filesrv mkdir -p isos/old/2025       with its missing parents; no error if it exists
"""
HASH_EXAMPLES = """\
  filesrv hash isos/big.iso            as xxh128sum prints it
  filesrv hash -r isos > SUMS          then: cd isos-copy && xxh128sum -c ../SUMS
"""
COMPLETION_EXAMPLES = """\
  filesrv completion bash > ~/.local/share/bash-completion/completions/filesrv
  filesrv completion zsh > ~/.zfunc/_filesrv     with fpath+=(~/.zfunc) before compinit
"""
HELP_EXAMPLES = """\
  filesrv help put                     the same as: filesrv put --help
  filesrv help                         the list of commands
"""


def parse_size(text: str) -> int:
    """'1048576', '64K', '1.5M', '2G' (powers of 1024) to a number of bytes."""
    value = text.strip().upper()
    for tail in ("IB", "B"):
        if value.endswith(tail) and len(value) > len(tail):
            value = value[: -len(tail)]
            break
    unit = value[-1] if value and value[-1] in "KMGT" else ""
    number = value[:-1] if unit else value
    try:
        amount = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1048576, 256K, 10M, 1G)")
    if amount != amount or amount < 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(amount * _UNITS[unit])


def positive_size(text: str) -> int:
    size = parse_size(text)
    if size < 1:
        raise argparse.ArgumentTypeError("must be at least 1 byte")
    return size


def _bounded(kind: Callable[[str], Any], low: float, *, strict: bool, what: str
             ) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` that is >= low (> low when strict)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not (value > low if strict else value >= low):  # also refuses NaN
            raise argparse.ArgumentTypeError(
                f"must be {'greater than' if strict else 'at least'} {low:g}")
        return value
    return parse


positive_int = _bounded(int, 1, strict=False, what="an integer")
non_negative_int = _bounded(int, 0, strict=False, what="an integer")
positive_float = _bounded(float, 0, strict=True, what="a number")
non_negative_float = _bounded(float, 0, strict=False, what="a number")


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- parser

class _HelpFormatter(argparse.HelpFormatter):
    """Wraps one-line texts (descriptions); keeps texts of several lines (examples) as written.

    Its command column is wide enough for 'ls (list)'.
    """

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=28)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        # argparse measures command names without the indent they are printed at: count it,
        # so that a long name ('completion') does not push its summary to the next line
        if action.help is not argparse.SUPPRESS and isinstance(action,
                                                               argparse._SubParsersAction):
            longest = max((len(self._format_action_invocation(choice))
                           for choice in action._get_subactions()), default=0)
            self._action_max_length = max(
                self._action_max_length,
                longest + self._current_indent + self._indent_increment)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="filesrv", usage="filesrv COMMAND [options] ...",
        description="Move big files between your own hosts: a forking daemon and its "
        "client,\nwith resumable transfers verified by XXH3-128.",
        epilog=EPILOG, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"filesrv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")

    def command(name: str, summary: str | None, examples: str, **kwargs: Any
                ) -> argparse.ArgumentParser:
        """A subcommand whose --help ends with its examples; without a summary, unlisted."""
        if summary is not None:
            kwargs["help"] = summary
        return sub.add_parser(name, prog=f"filesrv {name}", epilog="examples:\n" + examples,
                              formatter_class=_HelpFormatter, **kwargs)

    serve = command("serve", "run the daemon in the foreground", SERVE_EXAMPLES,
                    description="Serve a directory until SIGTERM or SIGINT. Prints "
                    "'listening on HOST:PORT' once the socket is bound; logs a line per "
                    "command on stderr, stamped in UTC (ISO 8601, e.g. 2026-11-29T21:21:39Z).")
    serve.add_argument("--config", metavar="FILE",
                       help="read options from this TOML file (keys as the long options: "
                       "root = \"/srv\", max-children = 32, read-only = true); the command "
                       "line wins over FILESRV_* variables, which win over the file "
                       "(default: $FILESRV_CONFIG)")
    serve.add_argument("--root", default=defaults.ROOT,
                       help=f"directory to serve, created if missing (default: {defaults.ROOT})")
    serve.add_argument("--host", default=defaults.HOST,
                       help="address to listen on; 0.0.0.0 or :: for every interface "
                       f"(default: {defaults.HOST})")
    serve.add_argument("--port", type=int, default=defaults.PORT,
                       help=f"TCP port; 0 picks a free one (default: {defaults.PORT})")
    serve.add_argument("--buffer-size", type=positive_size, default=defaults.BUFFER_SIZE,
                       metavar="BYTES", help="receive and hash buffer "
                       f"(default: {_BUFFER_SIZE_TEXT})")
    serve.add_argument("--max-children", type=positive_int, default=defaults.MAX_CHILDREN,
                       metavar="N",
                       help="connections served at once; beyond it a client gets 'busy' at "
                       "once. Connections still in their handshake (not yet authenticated) "
                       "hold at most half of them; beyond that the oldest is dropped "
                       f"(default: {defaults.MAX_CHILDREN})")
    serve.add_argument("--idle-timeout", type=positive_float, default=defaults.IDLE_TIMEOUT,
                       metavar="SECONDS", help="close a connection silent for this long "
                       f"(default: {defaults.IDLE_TIMEOUT:g})")
    serve.add_argument("--handshake-timeout", type=positive_float,
                       default=defaults.HANDSHAKE_TIMEOUT,
                       metavar="SECONDS", help="a new connection must finish TLS, hello and "
                       "authentication within this time "
                       f"(default: {defaults.HANDSHAKE_TIMEOUT:g})")
    serve.add_argument("--grace", type=non_negative_float, default=defaults.GRACE,
                       metavar="SECONDS",
                       help="on SIGTERM/SIGINT, let transfers in flight finish for up to this "
                       "long before closing them (they stay resumable); a second signal "
                       f"skips the wait (default: {defaults.GRACE:g})")
    serve.add_argument("--read-only", action="store_true",
                       help="refuse every upload with 'read_only'")
    serve.add_argument("--max-file-size", type=parse_size, default=None, metavar="BYTES",
                       help="refuse uploads larger than this, e.g. 10G (default: no limit)")
    serve.add_argument("--partial-max-age", type=positive_float,
                       default=defaults.PARTIAL_MAX_AGE,
                       metavar="SECONDS", help="delete unfinished uploads untouched for "
                       "this long, checked at start and hourly (default: "
                       f"{defaults.PARTIAL_MAX_AGE:g}, {defaults.PARTIAL_MAX_AGE / 86400:g} days)")
    serve.add_argument("--token-file", metavar="FILE",
                       help="require clients to prove they know one of the tokens in FILE "
                       "(one a line; HMAC challenge-response, the token never crosses the "
                       "wire)")
    serve.add_argument("--tls-cert", metavar="FILE", help="serve TLS (1.2 or newer) with this "
                       "certificate chain (PEM); needs --tls-key")
    serve.add_argument("--tls-key", metavar="FILE", help="private key for --tls-cert (PEM)")
    serve.set_defaults(run=run_serve)

    client_opts = argparse.ArgumentParser(add_help=False)  # every client command's
    client_opts.add_argument("-s", "--server", default=None,
                             metavar="HOST:PORT|REMOTE",
                             help="daemon address, or the name of a [remote.NAME] of the "
                             f"config file (default: $FILESRV_SERVER, else {defaults.SERVER}; "
                             f"port {defaults.PORT} if omitted)")
    client_opts.add_argument("--config", metavar="FILE",
                             help="client config file (default: $FILESRV_CONFIG, else "
                             "$XDG_CONFIG_HOME/filesrv/config.toml, else "
                             "~/.config/filesrv/config.toml, if it exists)")
    client_opts.add_argument("--json", action="store_true",
                             help="machine-readable output on stdout")
    # one setting, so that a -v on the command line wins over quiet = true in the file
    talk = client_opts.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                      help="on success print nothing but what the command is for (ls's "
                      "listing, hash's digests, --json records): no progress bar, no "
                      "summary, no notes; errors still print one line on stderr")
    talk.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                      help="also say, on stderr, which server answered and how (address, "
                      "protocol version, TLS or not, authenticated or not), and, on stdout, "
                      "a line per file of a tree (put -r, get -r)")
    client_opts.set_defaults(verbosity=0)
    client_opts.add_argument("--timeout", type=positive_float, default=defaults.TIMEOUT,
                             metavar="SECONDS",
                             help="give up on a silent server after this long, and on a busy one "
                             f"(waiting for a free connection slot) too (default: "
                             f"{defaults.TIMEOUT:g})")
    client_opts.add_argument("--retries", type=non_negative_int, default=defaults.RETRIES,
                             metavar="N",
                             help="when a connection is cut (mid-transfer, or a reply torn, "
                             "or the server restarts), reconnect and resume up to N times, "
                             "waiting 0.5 s, 1 s, 2 s, 4 s, 8 s, 8 s... in between: with the "
                             f"default {defaults.RETRIES}, about 15 s in all; 0 gives up at "
                             f"once (default: {defaults.RETRIES})")
    client_opts.add_argument("--token-file", metavar="FILE",
                             help="token for a server started with --token-file (default: "
                             "the token in $FILESRV_TOKEN, else the config file's token-file "
                             "or token)")
    client_opts.add_argument("--tls", action="store_true",
                             help="connect with TLS, verifying the server's certificate and "
                             "host name")
    client_opts.add_argument("--cafile", metavar="FILE",
                             help="CA certificate(s) to verify the server with (default: the "
                             "system's store)")

    transfer = argparse.ArgumentParser(add_help=False)  # what put and get share
    transfer.add_argument("--no-progress", action="store_true",
                          help="no progress bar (it is shown only when stderr is a terminal)")
    transfer.add_argument("--limit-rate", type=parse_size, default=None,
                          metavar="BYTES_PER_SECOND",
                          help="cap the transfer rate, e.g. 10M (K/M/G are powers of 1024)")
    transfer.add_argument("--buffer-size", type=positive_size, default=defaults.BUFFER_SIZE,
                          metavar="BYTES", help=f"transfer buffer (default: {_BUFFER_SIZE_TEXT})")
    policy = transfer.add_mutually_exclusive_group()
    policy.add_argument("--no-clobber", dest="overwrite", action="store_const",
                        const="no-clobber", help="leave an existing destination alone")
    policy.add_argument("--update", dest="overwrite", action="store_const", const="update",
                        help="transfer only when the destination's XXH3-128 differs")
    transfer.set_defaults(overwrite="replace")

    put = command("put", "upload files", PUT_EXAMPLES, parents=[client_opts, transfer],
                  usage="filesrv put [options] LOCAL [REMOTE]\n"
                        "       filesrv put [options] LOCAL... REMOTE_DIR\n"
                        "       filesrv put -r [options] LOCAL_DIR [REMOTE_DIR]",
                  description="Upload LOCAL to REMOTE (default: LOCAL's base name; a REMOTE "
                  "that is an existing directory, or ends in '/', receives the file inside "
                  "it), or several files into REMOTE_DIR, over one connection. Missing "
                  "remote directories are created; an existing file is replaced atomically "
                  "unless --no-clobber or --update says otherwise. Re-running an "
                  "interrupted put resumes it.")
    put.add_argument("paths", metavar="LOCAL", nargs="+", help=argparse.SUPPRESS)
    put.add_argument("-r", "--recursive", action="store_true",
                     help="upload the directory LOCAL_DIR as REMOTE_DIR (default: its name), "
                     "over one connection; empty directories are kept, files already there "
                     "with the same size and XXH3-128 are skipped (so a re-run moves only the "
                     "rest), symlinks are skipped, never followed")
    put.set_defaults(run=run_put)

    get = command("get", "download files", GET_EXAMPLES, parents=[client_opts, transfer],
                  usage="filesrv get [options] REMOTE [LOCAL]\n"
                        "       filesrv get [options] REMOTE... LOCAL_DIR\n"
                        "       filesrv get -r [options] REMOTE_DIR [LOCAL_DIR]",
                  description="Download REMOTE to LOCAL (default: REMOTE's base name "
                  "here; an existing directory receives the file inside it), or several "
                  "files into the existing directory LOCAL_DIR, over one connection. A "
                  "file appears at its name only once verified; an existing one is "
                  "replaced atomically unless --no-clobber or --update says otherwise. "
                  "Re-running an interrupted get resumes from the partial "
                  "'.NAME.filesrv-part' beside it.")
    get.add_argument("paths", metavar="REMOTE", nargs="+", help=argparse.SUPPRESS)
    get.add_argument("-r", "--recursive", action="store_true",
                     help="download the directory REMOTE_DIR as the directory LOCAL_DIR "
                     "(default: its name here; a LOCAL_DIR ending in / receives it inside), "
                     "over one connection; local files with the same size and XXH3-128 are "
                     "skipped, so a re-run moves only the rest")
    get.add_argument("--fsync", action="store_true",
                     help="flush each downloaded file to disk before it takes its name, so "
                     "it survives a power loss (as the server does for uploads); costs "
                     "little for big files")
    get.set_defaults(run=run_get)

    # `list` is `ls` under the name users of the original design expect; listed once
    for name, summary in (("ls", "list a remote directory (alias: list)"), ("list", None)):
        ls = command(name, summary, LS_EXAMPLES, parents=[client_opts],
                     description="List one remote directory (default: the root).")
        ls.add_argument("remote", metavar="REMOTE_DIR", nargs="?", default="")
        ls.add_argument("-l", dest="long", action="store_true",
                        help="long format: size and modification time")
        ls.add_argument("-r", "--recursive", action="store_true",
                        help="the whole tree, with paths relative to REMOTE_DIR")
        ls.set_defaults(run=run_ls)

    rm = command("rm", "delete remote files", RM_EXAMPLES, parents=[client_opts],
                 description="Delete remote files; directories only with -r. The "
                 "root itself is never removed. Refused by a --read-only daemon.")
    rm.add_argument("remote", metavar="REMOTE", nargs="+")
    rm.add_argument("-r", "--recursive", action="store_true",
                    help="delete directories and everything in them")
    rm.add_argument("-f", "--force", action="store_true",
                    help="a REMOTE that does not exist is no error (nothing is printed)")
    rm.set_defaults(run=run_rm)

    mv = command("mv", "rename a remote file or directory", MV_EXAMPLES,
                 parents=[client_opts], usage="filesrv mv [options] SRC DST",
                 description="Rename SRC to DST within the daemon's root, atomically; a "
                 "file at DST is replaced. A DST that is an existing directory, or ends in "
                 "'/', receives SRC inside it, as mv does. The parent of DST must exist.")
    mv.add_argument("src", metavar="SRC")
    mv.add_argument("dst", metavar="DST")
    mv.set_defaults(run=run_mv)

    mkdir = command("mkdir", "create remote directories", MKDIR_EXAMPLES,
                    parents=[client_opts], description="Create remote directories.")
    mkdir.add_argument("remote", metavar="REMOTE_DIR", nargs="+")
    mkdir.add_argument("-p", "--parents", action="store_true",
                       help="create missing parents; an existing directory is no error "
                       "(nothing is printed)")
    mkdir.set_defaults(run=run_mkdir)

    hashes = command("hash", "print XXH3-128 digests", HASH_EXAMPLES, parents=[client_opts],
                     description="Print the server's XXH3-128 digests exactly as "
                     "xxh128sum does, so that `filesrv hash -r dir > SUMS && cd dir && "
                     "xxh128sum -c SUMS` checks a downloaded tree with a standard tool.")
    hashes.add_argument("remote", metavar="REMOTE", nargs="+")
    hashes.add_argument("-r", "--recursive", action="store_true",
                        help="every file under a directory, named relative to it")
    hashes.set_defaults(run=run_hash)

    completion = command("completion", "print a shell completion script (bash, zsh)",
                         COMPLETION_EXAMPLES,
                         description="Print the completion script for SHELL: commands, "
                         "options, local paths, and remote paths (listed by the server that "
                         "the line's -s, --config, --tls, --cafile and --token-file name). "
                         "For the current bash only: source <(filesrv completion bash).")
    completion.add_argument("shell", metavar="SHELL", choices=("bash", "zsh"))
    completion.set_defaults(run=lambda args: run_completion(parser, args))

    helps = command("help", "show a command's options and examples", HELP_EXAMPLES,
                    description="Same as `filesrv COMMAND --help`; without COMMAND, the list "
                    "of commands.")
    helps.add_argument("topic", metavar="COMMAND", nargs="?")
    helps.set_defaults(run=lambda args: run_help(parser, args))
    parser.commands = sub.choices  # type: ignore[attr-defined]
    return parser


# ---------------------------------------------------------------- configuration

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# what one command does, not a setting: from the environment or a file --recursive would
# turn every later `rm` into `rm -r`, and --force would hide every mistyped path
_NOT_SETTINGS = ("help", "config", "recursive", "force")
_CREDENTIALS = ("token-file", "token_file", "token")  # a client file's; see _token()


class ClientConfig(NamedTuple):
    """The client's TOML file: top-level option defaults and named remotes."""

    path: str | None
    options: dict[str, Any]
    remotes: dict[str, dict[str, Any]]

    def credentials(self, remote: str | None) -> tuple[str | None, str | None]:
        """(token file, token) of the remote's section if it names one, else the top level's."""
        for table in (self.remotes.get(remote or ""), self.options):
            if table and any(key in table for key in _CREDENTIALS):
                return table.get("token-file", table.get("token_file")), table.get("token")
        return None, None


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]
                       ) -> argparse.Namespace:
    """Parse argv over defaults from FILESRV_* variables and a TOML file, in that order.

    Each long option --some-name has the variable FILESRV_SOME_NAME and the file key
    some-name (or some_name). Values go through the option's own parsing and checks.
    serve reads the file given by --config or FILESRV_CONFIG; the client commands that
    one too, else their own (client_config_path). `-s NAME` naming a [remote.NAME] of the
    client's file takes that section's settings over the file's top level.
    """
    name = next((arg for arg in argv if not arg.startswith("-")), None)
    command = parser.commands.get(name)  # type: ignore[attr-defined]
    if command is None or name in ("help", "completion"):  # argparse explains, or no settings
        return parser.parse_args(argv)
    explicit = _config_option(argv) or os.environ.get("FILESRV_CONFIG")
    if name == "serve":
        config = load_config(explicit) if explicit else {}
        _check_keys(config, {key for key, _ in _settings(command)}, explicit)
        _apply(command, config)
        return parser.parse_args(argv)
    client = load_client_config(explicit or client_config_path(), _client_keys(parser))
    _apply(command, _without_credentials(client.options))
    args = parser.parse_args(argv)
    remote = args.server if args.server in client.remotes else None
    if remote is not None:  # parse again, on a fresh parser, over the remote's settings
        parser = build_parser()
        command = parser.commands[name]  # type: ignore[attr-defined]
        merged = {**client.options, **client.remotes[remote]}
        server = merged.pop("server")
        _apply(command, _without_credentials(merged))
        args = parser.parse_args(argv)
        args.server = server
    args.config_credentials = client.credentials(remote)
    return args


def _config_option(argv: list[str]) -> str | None:
    """--config FILE of the command line, if any (argparse reports a malformed one later)."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--config")
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError:
        return None
    return known.config


def client_config_path() -> str | None:
    """$XDG_CONFIG_HOME/filesrv/config.toml (default ~/.config/...), if the file exists."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):  # the XDG rule: a relative value is ignored
        base = os.path.join(os.path.expanduser("~"), ".config")
    path = os.path.join(base, "filesrv", "config.toml")
    return path if os.path.exists(path) else None


def load_client_config(path: str | None, known: set[str]) -> ClientConfig:
    """The client's file, checked: known keys only, a private file if it holds a token."""
    if path is None:
        return ClientConfig(None, {}, {})
    config = load_config(path)
    remotes = config.pop("remote", {})
    if not isinstance(remotes, dict) or not all(isinstance(t, dict) for t in remotes.values()):
        raise ConfigError(f"{path}: remotes are sections: [remote.NAME]")
    _check_keys(config, known, path)
    for name, table in remotes.items():
        _check_keys(table, known, f"{path} [remote.{name}]")
        if not isinstance(table.get("server"), str):
            raise ConfigError(f"{path}: [remote.{name}] needs server = \"HOST:PORT\"")
    base = os.path.dirname(os.path.abspath(path))
    for table in (config, *remotes.values()):
        token = table.get("token")
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise ConfigError(f"{path}: token must be a non-empty string")
        for key in ("token-file", "token_file", "cafile"):  # relative to the file
            if isinstance(table.get(key), str):
                table[key] = os.path.join(base, os.path.expanduser(table[key]))
    if any("token" in table for table in (config, *remotes.values())):
        _require_private(path)
    return ClientConfig(path, config, remotes)


def _require_private(path: str) -> None:
    """A file holding a token must be the user's own and unreadable by others, as ssh
    requires of a private key."""
    st = os.stat(path)
    if st.st_uid not in (os.getuid(), 0):
        raise ConfigError(f"{path} holds a token but belongs to another user")
    if st.st_mode & 0o077:
        raise ConfigError(f"{path} holds a token but others may read or change it "
                          f"(mode {st.st_mode & 0o777:o}): chmod 600 {path}")


def _client_keys(parser: argparse.ArgumentParser) -> set[str]:
    """The keys a client file may hold: every client command's settings, and token."""
    keys = {"token"}
    for name, command in parser.commands.items():  # type: ignore[attr-defined]
        if name not in ("serve", "help"):
            keys |= {key for key, _ in _settings(command)}
    return keys


def _without_credentials(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in _CREDENTIALS}


def _settings(command: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    """(key, option) for each option that may come from the environment or a file."""
    for action in command._actions:  # argparse has no public list of a parser's options
        long = next((o for o in action.option_strings if o.startswith("--")), None)
        if long is not None and action.dest not in _NOT_SETTINGS:
            yield long[2:], action


def _apply(command: argparse.ArgumentParser, config: dict[str, Any]) -> None:
    """FILESRV_* variables, else the file's values, as the command's defaults."""
    for key, action in _settings(command):
        value = os.environ.get("FILESRV_" + key.upper().replace("-", "_"))
        if value is None:
            value = config.get(key, config.get(key.replace("-", "_")))
        if value is None:
            continue
        if action.nargs == 0:  # a flag: --read-only, --json, --no-clobber...
            if _flag_value("--" + key, value):
                command.set_defaults(**{action.dest: action.const})
        else:  # a string default goes through the option's type, as if typed
            command.set_defaults(**{action.dest: str(value)})


def _check_keys(config: dict[str, Any], known: set[str], where: str | None) -> None:
    """Unknown keys are an error: a typo must not pass silently."""
    unknown = sorted(key for key in config if key not in known
                     and key.replace("_", "-") not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}")


def _flag_value(option: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ConfigError(f"{option}: expected true or false, got {value!r}")


def load_config(path: str) -> dict[str, Any]:
    """A TOML file as a dict (serve's --config and the client's file)."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ConfigError(f"reading {path} needs Python 3.11 (tomllib) or the tomli "
                              "package") from None
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


# ---------------------------------------------------------------- commands

def run_serve(args: argparse.Namespace) -> int:
    from .fileio import read_tokens
    from .server import ServerOptions, serve, tls_context
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    options = ServerOptions(
        buffer_size=args.buffer_size, max_children=args.max_children,
        idle_timeout=args.idle_timeout, handshake_timeout=args.handshake_timeout,
        grace=args.grace, read_only=args.read_only, max_file_size=args.max_file_size,
        partial_max_age=args.partial_max_age,
        tokens=read_tokens(args.token_file) if args.token_file else (),
        tls=tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None)
    return serve(args.root, args.host, args.port, options)


def _client(args: argparse.Namespace) -> Any:
    from .client import Client, parse_server, read_token_file
    try:
        host, port = parse_server(defaults.SERVER if args.server is None else args.server)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    token = _token(args, read_token_file)
    if args.cafile and not args.tls:
        raise UsageError("--cafile needs --tls")
    # the transfer options exist for put and get only; the others keep the defaults
    transfer = {key: getattr(args, key) for key in ("buffer_size", "limit_rate")
                if hasattr(args, key)}
    client = Client(host, port, timeout=args.timeout, retries=args.retries, token=token,
                    on_wait=None if _quiet(args) else _tell_waiting, tls=args.tls,
                    cafile=args.cafile, durable=getattr(args, "fsync", False), **transfer)
    if _verbose(args):
        client.on_connect = _tell_session
    return client


def _quiet(args: argparse.Namespace) -> bool:
    """-q: nothing on success but the command's own output."""
    return getattr(args, "verbosity", 0) < 0


def _verbose(args: argparse.Namespace) -> bool:
    return getattr(args, "verbosity", 0) > 0


def _tell_waiting(message: str) -> None:
    """A busy server: say once why nothing happens yet (the client waits, see --timeout)."""
    print(f"filesrv: {message}", file=sys.stderr, flush=True)


def _tell_session(session: Any) -> None:
    """-v: which server answered, and how (after each handshake, reconnections too)."""
    tls = f"TLS ({session.tls})" if session.tls else "no TLS"
    auth = "authenticated with a token" if session.authenticated else "no authentication"
    _note(f"filesrv: connected to {session.address} ({session.server}), protocol version "
          f"{session.version}, {tls}, {auth}", sys.stderr)


def _token(args: argparse.Namespace, read_token_file: Callable[[str], bytes]
           ) -> bytes | None:
    """The command line's --token-file, then FILESRV_TOKEN_FILE, FILESRV_TOKEN, then the
    config file's token-file or token (its remote's section first)."""
    if args.token_file:
        return read_token_file(os.path.expanduser(args.token_file))
    from_environment = os.environ.get("FILESRV_TOKEN", "").strip()
    if from_environment:
        return from_environment.encode()
    token_file, token = getattr(args, "config_credentials", (None, None))
    if token_file:
        return read_token_file(token_file)
    return token.strip().encode() if token else None


def _one_tree(args: argparse.Namespace) -> tuple[str, str | None]:
    if len(args.paths) > 2:
        raise UsageError("with -r, give one directory and at most one destination")
    return args.paths[0], (args.paths[1] if len(args.paths) == 2 else None)


def run_put_tree(args: argparse.Namespace) -> int:
    from .client import plan_local_tree
    local_dir, remote = _one_tree(args)
    name = os.path.basename(os.path.normpath(local_dir))
    remote = name if remote is None else remote + name if remote.endswith("/") else remote
    plan = plan_local_tree(local_dir)
    for link in plan.skipped_links if not _quiet(args) else ():
        print(f"filesrv: skipped symlink {link} (symlinks are not followed)", file=sys.stderr)
    for unnamed in plan.skipped_names if not _quiet(args) else ():
        print(f"filesrv: skipped {unnamed}: its name is not valid UTF-8, which the protocol "
              "needs", file=sys.stderr)
    total = sum(size for _, size in plan.files)
    started = time.monotonic()
    with _client(args) as client, TreeProgress(f"put {remote}", total, len(plan.files),
                                               args, verb="uploaded") as bar:
        client.on_retry = bar.retrying
        results = client.put_tree(local_dir, remote, progress=bar.file_progress,
                                  overwrite=args.overwrite, on_file=bar.file_done, plan=plan)
    _report_tree("uploaded", remote, results, time.monotonic() - started, client, args)
    return 0


def run_get_tree(args: argparse.Namespace) -> int:
    remote, local = _one_tree(args)
    name = remote.rstrip("/").rsplit("/", 1)[-1] or "root"
    # LOCAL is the tree's own directory whether or not it exists yet, so that re-running
    # the same command after an interruption lands in the same place
    local = name if local is None else local + name if local.endswith(os.sep) else local
    started = time.monotonic()
    with _client(args) as client:
        listing = client.ls(remote, recursive=True)
        files = [e for e in listing if e.type == "file"]
        with TreeProgress(f"get {remote}", sum(e.size for e in files), len(files),
                          args, verb="downloaded") as bar:
            client.on_retry = bar.retrying
            results = client.get_tree(remote, local, progress=bar.file_progress,
                                      overwrite=args.overwrite, on_file=bar.file_done,
                                      listing=listing)
    _report_tree("downloaded", remote, results, time.monotonic() - started, client, args)
    if listing.names_left_out:  # a backup that lacks files must not look complete
        raise NamesLeftOut(_left_out(listing.names_left_out))
    return 0


def _left_out(count: int) -> str:
    """The line for names on the server that a listing could not carry (PROTOCOL.md §4)."""
    names = "1 name on the server is" if count == 1 else f"{count} names on the server are"
    return f"{names} not UTF-8 and {'was' if count == 1 else 'were'} left out"


def _warn_left_out(listing: Any) -> None:
    if listing.names_left_out:
        print(f"filesrv: {_left_out(listing.names_left_out)}", file=sys.stderr, flush=True)


def _report_tree(verb: str, where: str, results: list[Any], seconds: float, client: Any,
                 args: argparse.Namespace) -> None:
    """JSON: a line per file (printed as each completes, see TreeProgress); else a summary."""
    if args.json or _quiet(args):
        return
    skipped = sum(1 for r in results if r.skipped)
    moved = sum(r.size - r.resumed_from for r in results if not r.skipped)
    reconnected = ""
    if client.reconnects:  # the client's count: a batch's files share their reconnects
        times = "once" if client.reconnects == 1 else f"{client.reconnects} times"
        reconnected = f", {client.reconnect_seconds:.2f} s spent reconnecting {times}"
    print(f"{verb} {where}: {_counted(len(results) - skipped, 'file')} ({format_size(moved)}) "
          f"in {seconds:.2f} s{reconnected}, {skipped} already there and skipped", flush=True)


def _counted(n: int, noun: str) -> str:
    """'1 file', '2 files': the count with its noun in the number it takes."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _sources_and_target(paths: list[str]) -> tuple[list[str], str | None, bool]:
    """(sources, target, target is a directory) from the positional paths, as cp reads them."""
    if len(paths) == 1:
        return paths, None, False
    return paths[:-1], paths[-1], len(paths) > 2


def run_put(args: argparse.Namespace) -> int:
    if args.recursive:
        return run_put_tree(args)
    locals_, target, into_dir = _sources_and_target(args.paths)
    if into_dir and target is not None and not target.endswith("/"):
        target += "/"
    with _client(args) as client:
        for local in locals_:
            name = os.path.basename(local.rstrip("/"))
            remote = target if target is not None else name
            if remote == "" or remote.endswith("/"):
                remote += name
            if os.path.isdir(local):  # as get says of a remote directory: same words, status
                raise IsADirectory(f"{local} is a directory (use -r)")
            try:
                result = _put_file(client, local, remote, args)
            except IsADirectory:
                # REMOTE is an existing directory: the file goes inside it, as with cp
                if remote != target or remote.endswith("/"):
                    raise
                result = _put_file(client, local, f"{remote}/{name}", args)
            _report("uploaded", result, args)
    return 0


def _put_file(client: Any, local: str, remote: str, args: argparse.Namespace) -> Any:
    with ProgressBar(f"put {remote}", args) as bar:
        client.on_retry = bar.retrying
        return client.put(local, remote, progress=bar, overwrite=args.overwrite)


def run_get(args: argparse.Namespace) -> int:
    if args.recursive:
        return run_get_tree(args)
    remotes, target, into_dir = _sources_and_target(args.paths)
    if into_dir and not os.path.isdir(target or ""):
        raise LocalError(f"{target} is not an existing directory")
    with _client(args) as client:
        for remote in remotes:
            name = remote.rstrip("/").rsplit("/", 1)[-1]
            local = target if target is not None else name
            if os.path.isdir(local):
                local = os.path.join(local, name)
            elif local.endswith(os.sep):
                if os.path.lexists(local.rstrip(os.sep)):  # there, but not a directory
                    raise LocalError(f"{local} is not a directory")
                raise LocalError(f"no such local directory {local}")
            if remote.endswith("/"):  # names a directory, as in a shell: say which it is
                _refuse_remote_dir(client, remote)
            into_stdout = _is_stdout(local)
            with ProgressBar(f"get {remote}", args) as bar:
                client.on_retry = bar.retrying
                try:
                    result = client.get(remote, local, progress=bar, overwrite=args.overwrite)
                except IsADirectory:
                    raise IsADirectory(f"{remote} is a directory (use -r)") from None
            # the file's bytes went to stdout (get FILE /dev/stdout): the report must not
            with contextlib.redirect_stdout(sys.stderr if into_stdout else sys.stdout):
                _report("downloaded", result, args)
    return 0


def _refuse_remote_dir(client: Any, remote: str) -> NoReturn:
    """`get DIR/`: a directory needs -r; `get FILE/`: a file is not a directory."""
    if client.stat(remote.rstrip("/")).type == "dir":
        raise IsADirectory(f"{remote} is a directory (use -r)")
    raise NotADirectory(f"{remote}: {remote.rstrip('/')} is a file, not a directory")


def _is_stdout(path: str) -> bool:
    """Whether `path` is where this process's standard output goes."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError):
        return False


def run_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:  # each entry is printed as it arrives: a huge tree
        entries = client.iter_ls(args.remote, recursive=args.recursive)  # is never held
        if args.json:
            _print_json_array(e.as_dict() for e in entries)
        else:
            for e in entries:
                name = e.name + ("/" if e.type == "dir" else "")
                if args.long:
                    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime))
                    size = "-" if e.type == "dir" else format_size(e.size)
                    print(f"{size:>10}  {when}  {name}")
                else:
                    print(name)
    sys.stdout.flush()
    _warn_left_out(entries)  # after the listing, where it is seen
    return 0


def _print_json_array(items: Iterator[Any]) -> None:
    """What print(json.dumps(list(items))) prints, written item by item."""
    sys.stdout.write("[")
    for i, item in enumerate(items):
        sys.stdout.write((", " if i else "") + json.dumps(item, ensure_ascii=False))
    sys.stdout.write("]\n")


def run_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for remote in args.remote:
            try:
                removed = client.rm(remote, recursive=args.recursive)
            except (NotFound, NotADirectory):  # as rm -f: ENOENT and ENOTDIR
                if not args.force:
                    raise
                if args.json:
                    _say(args, {"path": remote, "removed": 0}, "")
                continue
            _say(args, {"path": remote, "removed": removed},
                 f"removed {remote}" + (f" ({removed} entries)" if removed > 1 else ""))
    return 0


def run_mv(args: argparse.Namespace) -> int:
    src, dst = args.src, args.dst
    name = src.rstrip("/").rsplit("/", 1)[-1]
    if dst.endswith("/") and name:  # "DIR/" can only mean inside DIR
        dst += name
    with _client(args) as client:
        try:
            client.mv(src, dst)
        except IsADirectory:
            # DST is an existing directory: SRC goes inside it, as with mv
            if dst != args.dst or not name:
                raise
            dst = f"{dst}/{name}"
            client.mv(src, dst)
    _say(args, {"src": src, "dst": dst}, f"moved {src} -> {dst}")
    return 0


def run_mkdir(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for remote in args.remote:
            created = _make_dir(client, remote, args.parents)
            if created or args.json:  # mkdir -p of an existing directory says nothing
                _say(args, {"path": remote, "created": created}, f"created {remote}")
    return 0


def _make_dir(client: Any, remote: str, parents: bool) -> bool:
    """Create a remote directory; False if -p found it there already."""
    if not parents:
        client.mkdir(remote)
        return True
    try:  # one exchange in the common cases, and it tells whether the directory was there
        client.mkdir(remote)
        return True
    except AlreadyExists:  # the server says not_a_directory for anything else there
        return False
    except NotFound:  # a parent is missing
        client.mkdir(remote, parents=True)
        return True


def run_help(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`filesrv help COMMAND` is `filesrv COMMAND --help`; alone, the list of commands."""
    if args.topic is None:
        parser.print_help()
        return 0
    command = parser.commands.get(args.topic)  # type: ignore[attr-defined]
    if command is None:
        raise UsageError(f"no command {args.topic!r} (the commands: filesrv help)")
    command.print_help()
    return 0


def run_completion(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`filesrv completion SHELL`: the script, generated from this very parser."""
    try:
        from .completion import script
        text = script(parser, args.shell)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"filesrv completion needs the {exc.name} package "
                          f"(pip install {exc.name})") from None
    sys.stdout.write(text)
    return 0


def run_hash(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for remote in args.remote:
            info = client.stat(remote)
            if info.type == "file":
                _print_digest(args, remote, info.size, info.xxh128)
                continue
            if not args.recursive:
                raise IsADirectory(f"{remote} is a directory (use -r)")
            listing = client.ls(remote.rstrip("/"), recursive=True)
            for name, size, digest in client.hash_tree(remote, listing=listing):
                _print_digest(args, name, size, digest)
            _warn_left_out(listing)
    return 0


def _print_digest(args: argparse.Namespace, name: str, size: int, digest: str | None) -> None:
    _say(args, {"path": name, "size": size, "xxh128": digest}, f"{digest}  {name}",
         summary=False)


def _say(args: argparse.Namespace, record: dict[str, Any], human: str, *,
         summary: bool = True) -> None:
    """A record with --json, else the human line; -q silences a summary (not output)."""
    if summary and _quiet(args) and not args.json:
        return
    print(json.dumps(record, ensure_ascii=False) if args.json else human, flush=True)


def _note(line: str, stream: Any) -> None:
    """A line that must not tear a progress bar drawn on the terminal."""
    if _byte_bar_class.cache_info().currsize:  # tqdm is loaded: a bar may be on screen
        _byte_bar_class().write(line, file=stream)
        stream.flush()
    else:
        print(line, file=stream, flush=True)


def _report(verb: str, result: Any, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(result.as_dict(), ensure_ascii=False), flush=True)
        return
    if _quiet(args):
        return
    if result.skipped:
        print(f"skipped {result.path}: the destination exists"
              f"{' with the same XXH3-128' if args.overwrite == 'update' else ''}", flush=True)
        return
    resumed = f", resumed at {format_size(result.resumed_from)}" if result.resumed_from else ""
    print(f"{verb} {result.path}: {format_size(result.size)} in {result.seconds:.2f} s "
          f"({format_size(result.rate)}/s{_reconnected(result)}){resumed}, "
          f"xxh128 {result.xxh128}", flush=True)


def _reconnected(result: Any) -> str:
    """How much of the time went to reconnecting, which the rate leaves out."""
    if not result.reconnects:
        return ""
    times = "once" if result.reconnects == 1 else f"{result.reconnects} times"
    return (f" while moving; {result.reconnect_seconds:.2f} s spent reconnecting "
            f"{times}")


_BAR_FORMAT = ("{desc}: {percentage:3.0f}%|{bar}| {done_iec}/{total_iec} "
               "[{elapsed}<{remaining}, {rate_iec}{postfix}]")
# while no data moves, what is happening instead of a rate and a time left
_STATUS_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {done_iec}/{total_iec} [{status}{postfix}]"


@functools.lru_cache(maxsize=None)
def _byte_bar_class() -> type:
    """tqdm (imported only when a bar is drawn) counting bytes in the summary's units."""
    from tqdm import tqdm

    class ByteBar(tqdm):  # type: ignore[misc]
        """Sizes and rate in IEC units (KiB, MiB/s), as format_size writes them; a
        `status` (e.g. reconnecting) replaces the rate and the time left while set."""

        status = ""
        _moving_from = float("inf")  # when data was expected to move again after a cut

        @property
        def format_dict(self) -> dict[str, Any]:
            info = super().format_dict
            rate, elapsed = info["rate"], info["elapsed"]
            if rate is None and elapsed >= 1:  # tqdm's fallback, once it means something
                rate = (info["n"] - info["initial"]) / elapsed
            info.update(done_iec=format_size(info["n"]),
                        total_iec=format_size(info["total"] or 0),
                        rate_iec=f"{format_size(rate)}/s" if rate else "?/s",
                        status=self.status)
            if self.status:
                info["bar_format"] = _STATUS_FORMAT
            return info

        def reconnecting(self, what: str, delay: float) -> None:
            """Show `what` instead of the rate until resumed(); data moves again in about
            `delay` seconds (the client's wait before it connects again)."""
            self.status = what
            self._moving_from = self._time() + delay
            self.refresh()

        def resumed(self) -> None:
            """Data moves again: the rate's next sample starts when the client reconnected,
            so the outage is not in it (as a whole batch reported at once would be, if it
            started at its first report). The elapsed time stays the wall clock's."""
            self.status = ""
            self.last_print_n = self.n
            self.last_print_t = min(self._time(), self._moving_from)

        def skip(self, count: int) -> None:
            """Move by bytes that did not cross the wire just now (already there, resumed):
            counted in the bar, left out of the rate."""
            self.n += count
            self.last_print_n += count
            self.initial += count
            self.refresh()

    return ByteBar


def _byte_bar(label: str, total: int, initial: int = 0, postfix: str | None = None) -> Any:
    return _byte_bar_class()(total=total, initial=initial, desc=label, unit="B",
                             bar_format=_BAR_FORMAT, file=sys.stderr, dynamic_ncols=True,
                             leave=False, postfix=postfix)


class _Status:
    """A transfer's bar, if any, and the reconnect in progress: said on the bar, or on
    stderr when there is no bar (piped, --no-progress)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled = not args.no_progress and sys.stderr.isatty() and not _quiet(args)
        self.quiet = _quiet(args)
        self.bar: Any = None
        self.reconnecting = False  # from a cut until data moves again

    def retrying(self, notice: Any) -> None:
        """Client.on_retry: the connection was cut and the client is about to reconnect."""
        self.reconnecting = True
        what = (f"reconnecting in {notice.delay:g} s (attempt {notice.attempt} of "
                f"{notice.retries})")
        if self.bar is None:
            if self.quiet:
                return
            # the reason without the advice for when retries run out: this is a retry
            reason = notice.reason.split("; run the same command again")[0]
            print(f"filesrv: connection lost, {what}: {reason}", file=sys.stderr,
                  flush=True)
        else:
            self.bar.reconnecting(what, notice.delay)

    def moving_again(self) -> bool:
        """Called as data moves; True the first time after a reconnect, when the bar's
        rate restarts so the outage does not drag it down."""
        if not self.reconnecting:
            return False
        self.reconnecting = False
        if self.bar is not None:
            self.bar.resumed()
        return True


class ProgressBar(_Status):
    """A bar on stderr for one file, only when stderr is a terminal; starts at the resumed
    offset. Call it as the transfer's progress callback."""

    def __init__(self, label: str, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.label = label

    def __enter__(self) -> "ProgressBar":
        return self

    def __call__(self, done: int, total: int) -> None:
        again = self.moving_again()
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = _byte_bar(self.label, total, initial=done)
        elif again:  # a resumed attempt starts where the server's partial ends
            self.bar.skip(done - self.bar.n)
        else:
            self.bar.update(done - self.bar.n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


class TreeProgress(_Status):
    """One bar for a whole tree (bytes, rate, ETA, files done); with --json, a record
    for each file as it completes. Bytes already there (skipped files, the resumed part
    of a file) advance the bar but not its rate."""

    def __init__(self, label: str, total: int, files: int, args: argparse.Namespace, *,
                 verb: str = "moved") -> None:
        super().__init__(args)
        self.label, self.total, self.files = label, total, files
        self.json = args.json
        self.verb = verb  # -v: a line per file, "uploaded a/b: ..."
        self.verbose = _verbose(args) and not args.json
        self.done_files = 0
        self.file_bytes: int | None = None  # of the current file, as last reported
        self.complete_report = False  # its one report said "all there": moved or not?

    def __enter__(self) -> "TreeProgress":
        if self.enabled:
            self.bar = _byte_bar(self.label, self.total, postfix=self.postfix())
        return self

    def postfix(self) -> str:
        return f"{self.done_files}/{self.files} files"

    def file_progress(self, done: int, total: int) -> None:
        again = self.moving_again()
        if self.file_bytes is None and done == total:
            # a batched file, or one whose partial was complete: file_done tells which
            self.complete_report = True
        elif self.bar is not None:
            if self.file_bytes is None or again:  # the part already there
                self.bar.skip(done - (self.file_bytes or 0))
            else:
                self.bar.update(done - self.file_bytes)
        self.file_bytes = done

    def file_done(self, result: Any) -> None:
        if self.json:  # as each file completes: a killed run still says what it finished
            print(json.dumps(result.as_dict(), ensure_ascii=False), flush=True)
        elif self.verbose:
            _note(_file_line(self.verb, result), sys.stdout)
        self.done_files += 1
        if self.bar is not None:
            if result.skipped or (self.complete_report and not result.bytes_moved):
                self.bar.skip(result.size)
            elif self.complete_report:
                self.bar.update(result.size)
            self.bar.set_postfix_str(self.postfix())
        self.file_bytes = None
        self.complete_report = False

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _file_line(verb: str, result: Any) -> str:
    """-v: one file of a tree."""
    if result.skipped:
        return f"skipped {result.path}: already there"
    return f"{verb} {result.path}: {format_size(result.size)}, xxh128 {result.xxh128}"


class UsageError(Exception):
    """Bad command-line input that argparse could not catch."""


# ---------------------------------------------------------------- entry point

def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # like git: the commands, each with a line
        parser.print_help()
        return 0
    try:
        args = parse_command_line(parser, argv)
    except ConfigError as exc:
        print(f"filesrv: {exc.message}", file=sys.stderr)
        return exc.exit_status
    try:
        return int(args.run(args))
    except UsageError as exc:
        parser.error(str(exc))
    except FilesrvError as exc:
        print(f"filesrv: {exc.message}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("filesrv: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed by a pager or `head`
        _die_of_sigpipe()
        return 128 + 13  # not reached: SIGPIPE's default action ends the process
    except OSError as exc:  # local: the client maps every failure of the connection itself
        print(f"filesrv: {_local_failure(exc)}", file=sys.stderr)
        return LocalError.exit_status
    except UnicodeError:  # a local name that is not UTF-8 where the protocol needs one
        print("filesrv: a local name is not valid UTF-8, which the protocol needs",
              file=sys.stderr)
        return LocalError.exit_status
    return 1


def _local_failure(exc: OSError) -> str:
    """One line for a local OSError: what failed, and on which file."""
    if exc.filename is None:
        return exc.strerror or str(exc)
    name = os.fsencode(exc.filename).decode("utf-8", "backslashreplace")
    return f"{name}: {exc.strerror or exc}"


def _die_of_sigpipe() -> None:
    """Stdout was closed early (`| head`): end quietly, as coreutils do, killed by SIGPIPE
    (a shell shows 141), with nothing on stderr and no complaint when Python exits."""
    import signal
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the final flush of stdout must not fail again
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
