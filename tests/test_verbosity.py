"""What the client says on success (-q, -v, piped) and what the daemon's log says (issue 14)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from conftest import cli, wait_for

# UTC in ISO 8601: a Z, or an offset of +00:00
UTC_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(Z|\+00:00) ")


# ---------------------------------------------------------------- the daemon's log

def test_every_daemon_log_line_carries_a_utc_timestamp(daemon):
    cli("mkdir", "-s", daemon.address, "d")
    wait_for(lambda: " mkdir " in daemon.log_text(), what="the mkdir line")
    lines = daemon.log_text().splitlines()
    assert lines, "the daemon logged nothing"
    now = datetime.now(timezone.utc)
    for line in lines:
        stamp = UTC_STAMP.match(line)
        assert stamp, f"no UTC timestamp: {line!r}"
        when = datetime.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S").replace(
            tzinfo=timezone.utc)
        # UTC, not local time written with a Z: within minutes of the UTC clock
        assert abs(when - now) < timedelta(minutes=10), (line, now)


def test_a_read_only_daemon_does_not_claim_clients_may_write(daemon_factory):
    ro = daemon_factory("--read-only")
    start = ro.log_text()
    assert "no --token-file" in start, start  # still warns that anyone may connect
    assert "write" not in start, start
    assert "may read the root" in start, start
    rw = daemon_factory(root=ro.root.parent / "rw")
    assert "may read and write the root" in rw.log_text()


def test_a_rename_is_logged_with_both_paths(daemon):
    cli("mkdir", "-s", daemon.address, "old")
    cli("mv", "-s", daemon.address, "old", "new")
    wait_for(lambda: " mv " in daemon.log_text(), what="the mv line")
    line = next(line for line in daemon.log_text().splitlines() if " mv " in line)
    assert " mv 'old' -> 'new' " in line and line.endswith(" ok"), line
