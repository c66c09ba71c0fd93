"""docs/PROTOCOL.md's worked example, replayed byte for byte against a live daemon."""

from __future__ import annotations

import json
import re
import struct

from conftest import REPO, RawConnection

LINE = re.compile(r"^(→|←) \[(\d+|n)\] (\{.*?\})(?: \+ (.*))?$")
ANY = "__any__"


def example_lines() -> list[tuple[str, str, str, str | None]]:
    doc = (REPO / "docs" / "PROTOCOL.md").read_text()
    block = doc.split("## 8. Worked example", 1)[1].split("```")[1]
    lines = [LINE.match(line) for line in block.strip().splitlines()]
    assert all(lines), "every line of the example must parse"
    return [m.groups() for m in lines]  # type: ignore[union-attr]


def loads_with_placeholders(text: str) -> object:
    return json.loads(re.sub(r"\b(ETAG|MTIME|L)\b", f'"{ANY}"', text))


def matches(expected: object, actual: object) -> bool:
    if expected == ANY:
        return True
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(
            matches(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(map(matches, expected, actual))
    return expected == actual


def test_worked_example_is_exactly_what_the_daemon_does(daemon):
    lines = example_lines()
    assert len(lines) >= 10
    conn = RawConnection(daemon.port, handshake=False)
    try:
        for direction, length, header, body in lines:
            if direction == "→":
                payload = header.encode()
                assert int(length) == len(payload), f"wrong length in the doc: {header}"
                conn.send(struct.pack(">I", len(payload)) + payload
                          + (body.encode() if body else b""))
                continue
            reply = conn.read_header()
            assert matches(loads_with_placeholders(header), reply), (header, reply)
            if length != "n":
                assert int(length) == len(json.dumps(reply, separators=(",", ":")).encode())
            if body is not None:
                received = conn.read_body(reply["length"])
                if body.startswith("["):
                    assert matches(loads_with_placeholders(body), json.loads(received))
                else:
                    assert received == body.encode()
    finally:
        conn.close()
