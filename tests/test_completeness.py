"""Every op of the protocol is declared in every place that must know it.

An op lives in six places: the protocol's parsers (and its Request class), the daemon's
command table (or its connection lifecycle, for hello and auth), the client (a method that
builds the request and sends it), the fuzz corpus of tests/test_hostile.py, and
docs/PROTOCOL.md (§5 has a section for each command; every request's shape is shown in
§2 or §5). docs/ARCHITECTURE.md lists these places for whoever adds a command; this test
fails, naming the op and the table, when one of them was forgotten.
"""

from __future__ import annotations

import ast
import re

import test_hostile
from conftest import REPO, RawConnection
from filesrv import protocol
from filesrv.handlers import COMMANDS

# Not commands of their own: hello and auth are the connection's lifecycle (PROTOCOL.md §2);
# data and commit only ever follow a put or put_files inside that command's exchange.
LIFECYCLE_OPS = {"hello", "auth"}
FOLLOW_UP_OPS = {"data", "commit"}


def request_classes() -> dict[str, type]:
    """Every Request subclass the protocol declares, by class name."""
    return {cls.__name__: cls for cls in protocol.Request.__subclasses__()}


def parser_ops() -> set[str]:
    return set(protocol._PARSERS)


def request_class_ops() -> set[str]:
    return {cls.op for cls in request_classes().values()}


def server_command_ops() -> set[str]:
    return {request.op for request in COMMANDS}


def client_sent_ops() -> set[str]:
    """Ops the client sends: a Request class called and framed (`Stat(...).frame()`) in a
    module of the package other than the protocol itself."""
    classes = request_classes()
    sent: set[str] = set()
    for module in (REPO / "filesrv").glob("*.py"):
        if module.name == "protocol.py":
            continue
        for node in ast.walk(ast.parse(module.read_text(), str(module))):
            if (isinstance(node, ast.Attribute) and node.attr == "frame"
                    and isinstance(node.value, ast.Call)
                    and isinstance(node.value.func, ast.Name)
                    and node.value.func.id in classes):
                sent.add(classes[node.value.func.id].op)
    return sent


def fuzz_corpus_ops() -> set[str]:
    return {header["op"] for header in test_hostile.CORPUS}


def _doc_sections() -> dict[str, str]:
    """docs/PROTOCOL.md's top-level sections, by number ("2", "5", ...)."""
    doc = (REPO / "docs" / "PROTOCOL.md").read_text()
    parts = re.split(r"^## (\d+)\. .*$", doc, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def doc_command_ops() -> set[str]:
    """The commands PROTOCOL.md §5 has a section for (`### 5.N `op` — ...`)."""
    return set(re.findall(r"^### 5\.\d+ `([a-z_]+)`", _doc_sections()["5"], re.MULTILINE))


def doc_request_ops() -> set[str]:
    """Every op whose request PROTOCOL.md shows (`"op": "x"`) in §2 or §5."""
    sections = _doc_sections()
    return set(re.findall(r'"op": "([a-z_]+)"', sections["2"] + sections["5"]))


def test_no_op_is_missing_from_any_table():
    tables = {
        "protocol parsers (protocol._PARSERS)": parser_ops(),
        "protocol Request classes": request_class_ops(),
        "daemon: command table + lifecycle + follow-ups":
            server_command_ops() | LIFECYCLE_OPS | FOLLOW_UP_OPS,
        "client (a Request built and framed)": client_sent_ops(),
        "fuzz corpus (tests/test_hostile.py CORPUS)": fuzz_corpus_ops(),
        "PROTOCOL.md §2/§5 request shapes": doc_request_ops(),
    }
    every_op = set().union(*tables.values())
    missing = {name: sorted(every_op - ops) for name, ops in tables.items() if every_op - ops}
    assert not missing, f"ops missing from tables: {missing}"


def test_every_command_has_its_section_in_protocol_doc_and_nothing_else_does():
    commands = server_command_ops()
    assert commands, "the command table is empty"
    assert doc_command_ops() == commands, (
        f"PROTOCOL.md §5 sections without a command: {sorted(doc_command_ops() - commands)}; "
        f"commands without a §5 section: {sorted(commands - doc_command_ops())}")


def test_lifecycle_and_follow_up_ops_are_not_commands():
    assert not server_command_ops() & (LIFECYCLE_OPS | FOLLOW_UP_OPS)


def test_each_command_declares_a_body_exactly_when_its_exchange_sends_data():
    """The table's `body` flag agrees with PROTOCOL.md: a `data` request in the command's
    §5 section."""
    section_5 = _doc_sections()["5"]
    sections = dict(re.findall(r"^### 5\.\d+ `([a-z_]+)`(.*?)(?=^### |\Z)", section_5,
                               re.MULTILINE | re.DOTALL))
    for request, command in COMMANDS.items():
        sends_data = '"op": "data"' in sections[request.op]
        assert command.body == sends_data, request.op
        assert command.help, request.op


def doc_writing_ops() -> set[str]:
    """The ops PROTOCOL.md's error table says a read-only server refuses."""
    row = re.search(r"^\| `read_only` .*writes: ([a-z_, ]+)", _doc_sections()["3"], re.MULTILINE)
    assert row, "PROTOCOL.md §3 has no read_only row naming the writes"
    return {op.strip() for op in row.group(1).split(",")}


def test_a_read_only_server_refuses_exactly_the_writes_the_protocol_names(daemon_factory):
    """The table's `writes` flags are the writes PROTOCOL.md §3 names, and the daemon
    enforces them: each command of the fuzz corpus, sent to a read-only daemon, is refused
    as read_only if and only if it writes."""
    writes = doc_writing_ops()
    assert {r.op for r, c in COMMANDS.items() if c.writes} == writes
    daemon = daemon_factory("--read-only")
    for header in test_hostile.CORPUS:
        if header["op"] not in server_command_ops():
            continue  # hello, auth, data, commit
        conn = RawConnection(daemon.port)
        try:
            reply = conn.request(header)
        finally:
            conn.close()
        assert (reply.get("code") == "read_only") == (header["op"] in writes), (header, reply)
