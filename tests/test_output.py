"""Honest output: what the bar and the summary say about rates, reconnects and paths."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import (RawConnection, cli, cli_json, random_file, run_on_terminal,
                      xxh128_of)

MiB = 1024 * 1024
# tqdm's own style too (binary values with SI names), so a test of rates fails on its rate
_UNIT = {"B": 1, "KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB, "kB": 1024, "MB": MiB,
         "GB": 1024 * MiB}


def rates_drawn(text: str) -> list[float]:
    """Every rate a bar drew, in bytes a second."""
    return [float(n) * _UNIT[u]
            for n, u in re.findall(r"([\d.]+) ?(B|KiB|MiB|GiB|kB|MB|GB)/s", text)]


def remote_etag(daemon, remote: str) -> str:
    conn = RawConnection(daemon.port)
    try:
        from filesrv.protocol import Get
        size = (daemon.root / remote).stat().st_size
        return conn.request(Get(path=remote, offset=size).header())["etag"]
    finally:
        conn.close()


# ---------------------------------------------------------------- 9: reconnects

def test_a_cut_transfer_records_its_reconnects_and_the_bytes_that_moved(daemon, fault_proxy,
                                                                       tmp_path):
    size = 8 * MiB
    src = random_file(tmp_path / "cut.bin", size)
    proxy = fault_proxy(daemon.port, "--cut-after", "3M", "--cut-connections", "1")
    put = cli("put", "-s", proxy.address, "--json", str(src))
    record = json.loads(put.stdout)
    assert record["resumed_from"] > 0 and record["reconnects"] == 1
    # the client waits 0.5 s before its first reconnect: time no data moved
    assert 0.5 <= record["reconnect_seconds"] < record["seconds"]
    # what the cut attempt sent counts too: at least the whole file crossed the wire
    assert record["transferred"] >= size
    assert "reconnecting in 0.5 s (attempt 1 of 5)" in put.stderr, put.stderr
    assert "Traceback" not in put.stderr and "run the same command" not in put.stderr

    proxy2 = fault_proxy(daemon.port, "--cut-after", "3M", "--cut-connections", "1")
    got = cli_json("get", "-s", proxy2.address, "cut.bin", str(tmp_path / "back.bin"))
    assert got["reconnects"] == 1 and got["resumed_from"] > 0
    assert 0.5 <= got["reconnect_seconds"] < got["seconds"]
    assert got["transferred"] >= size
    assert xxh128_of(tmp_path / "back.bin") == xxh128_of(src)


def test_the_summary_rate_leaves_out_the_time_spent_reconnecting(daemon, fault_proxy,
                                                                 tmp_path):
    size = 8 * MiB
    random_file(daemon.root / "cut.bin", size)
    proxy = fault_proxy(daemon.port, "--cut-after", "3M", "--cut-connections", "1")
    out = cli("get", "-s", proxy.address, "--limit-rate", "4M", "cut.bin",
              str(tmp_path / "back.bin")).stdout
    found = re.search(r"in ([\d.]+) s \(([\d.]+) MiB/s while moving; ([\d.]+) s spent "
                      r"reconnecting once\), resumed at", out)
    assert found, out
    seconds, rate, reconnecting = (float(g) for g in found.groups())
    assert 0.5 <= reconnecting < seconds
    # every byte of the file moved (the first 3 MiB in the cut attempt), and in less
    # time than the whole: the rate is above size / seconds, never the part after the cut
    # over the whole time, as it was
    assert rate * MiB >= size / seconds
    # and it is the rate of the time data moved, to the rounding of what is printed
    assert abs(rate * MiB * (seconds - reconnecting) - size) < 0.1 * size


def test_the_progress_bar_says_when_it_is_reconnecting(daemon, fault_proxy, tmp_path):
    random_file(daemon.root / "cut.bin", 8 * MiB)
    proxy = fault_proxy(daemon.port, "--cut-after", "3M", "--cut-connections", "1")
    status, drawn, stdout = run_on_terminal("get", "-s", proxy.address, "--limit-rate", "8M",
                                            "cut.bin", str(tmp_path / "back.bin"))
    assert status == 0, drawn
    assert "reconnecting in 0.5 s (attempt 1 of 5)" in drawn, drawn
    assert b"spent reconnecting once" in stdout


def test_a_tree_summary_says_how_long_it_spent_reconnecting(daemon, fault_proxy, tmp_path):
    for i in range(100):  # ~4 MiB of small files: cut in the middle of a batch
        random_file(tmp_path / "src" / f"f{i:03d}.bin", 40_000)
    proxy = fault_proxy(daemon.port, "--cut-after", "2M", "--cut-connections", "1")
    put = cli("put", "-s", proxy.address, "-r", str(tmp_path / "src"), "t")
    found = re.search(r"uploaded t: 100 files \(.*\) in ([\d.]+) s, ([\d.]+) s spent "
                      r"reconnecting once, 0 already there", put.stdout)
    assert found, put.stdout
    assert 0.5 <= float(found.group(2)) < float(found.group(1))
    assert "reconnecting in 0.5 s (attempt 1 of 5)" in put.stderr


# ---------------------------------------------------------------- 10: units, resumed rates

def test_the_bar_uses_the_summarys_iec_units(daemon, tmp_path):
    src = random_file(tmp_path / "u.bin", 4 * MiB)
    status, drawn, stdout = run_on_terminal("put", "-s", daemon.address, "--limit-rate", "8M",
                                            str(src))
    assert status == 0, drawn
    assert re.search(r"\d\.\d MiB/4\.0 MiB", drawn), drawn
    assert re.search(r"\d\.\d MiB/s", drawn), drawn
    assert not re.search(r"\d[kMG]B", drawn), drawn  # no SI prefix on binary sizes
    assert b"4.0 MiB in " in stdout and b" MiB/s)" in stdout


def test_a_resumed_trees_rate_leaves_out_the_bytes_already_there(daemon, tmp_path):
    tree = daemon.root / "t"
    for i in range(40):
        random_file(tree / f"f{i:02d}.bin", 500_000)  # 20 MB already here
    random_file(tree / "zz" / "big.bin", 8 * MiB)
    dest = tmp_path / "t"
    cli("get", "-s", daemon.address, "-r", "t", str(dest))
    big = dest / "zz" / "big.bin"
    # as an interrupted get leaves it: 6 MiB of the big file in its partial
    (dest / "zz" / ".big.bin.filesrv-part").write_bytes(big.read_bytes()[: 6 * MiB])
    (dest / "zz" / ".big.bin.filesrv-part.json").write_text(json.dumps(
        {"remote": "t/zz/big.bin", "etag": remote_etag(daemon, "t/zz/big.bin"),
         "size": 8 * MiB}))
    big.unlink()
    status, drawn, stdout = run_on_terminal("get", "-s", daemon.address, "-r",
                                            "--limit-rate", "1M", "--buffer-size", "64K",
                                            "t", str(dest))
    assert status == 0, drawn
    assert b"1 file (2.0 MiB)" in stdout and b"40 already there" in stdout
    rates = rates_drawn(drawn)
    assert rates, drawn
    # 2 MiB moved at 1 MiB/s; counting the 26 MiB already there as moved showed tens of
    # MiB/s. The bound leaves room for a burst after a pause (the cap is an average).
    assert max(rates) < 5 * MiB, drawn
    assert xxh128_of(dest / "zz" / "big.bin") == xxh128_of(tree / "zz" / "big.bin")


# ---------------------------------------------------------------- 11: messages

def test_a_missing_local_directory_is_named_as_the_user_gave_it(daemon, tmp_path):
    random_file(daemon.root / "f.bin", 10)
    missing = tmp_path / "no" / "such"
    r = cli("get", "-s", daemon.address, "f.bin", str(missing / "f.bin"), check=False)
    assert r.returncode == 9
    assert r.stderr == f"filesrv: no such local directory {missing}\n"
    r = cli("put", "-s", daemon.address, "-r", str(missing), check=False)
    assert r.returncode == 9
    assert r.stderr == f"filesrv: no such local directory {missing}\n"
    assert not (tmp_path / "no").exists()


def test_get_and_put_of_a_directory_without_r_say_so_alike(daemon, tmp_path):
    random_file(daemon.root / "d" / "f.bin", 10)
    random_file(tmp_path / "d" / "f.bin", 10)
    got = cli("get", "-s", daemon.address, "d", str(tmp_path / "x"), check=False)
    put = cli("put", "-s", daemon.address, str(tmp_path / "d"), "y", check=False)
    assert got.stderr == "filesrv: d is a directory (use -r)\n"
    assert put.stderr == f"filesrv: {tmp_path / 'd'} is a directory (use -r)\n"
    assert got.returncode == put.returncode == 4
    assert not (tmp_path / "x").exists() and not (daemon.root / "y").exists()


def test_the_bars_rate_after_a_reconnect_leaves_the_outage_out(monkeypatch):
    """The tree bar on a clock of our own: 1 MiB batches every 0.25 s (4 MiB/s), a cut, a
    0.5 s wait, the batch sent again. The rate never shows more than moved, nor the wait:
    counting from the batch's report (not from the reconnect) made it 5.2 MiB/s."""
    import argparse
    import io

    from filesrv import cli as filesrv_cli
    from filesrv.client import Reconnecting
    now = [1000.0]
    monkeypatch.setattr("tqdm.std.time", lambda: now[0])  # the clock a bar takes at start
    monkeypatch.setattr(filesrv_cli.sys, "stderr", io.StringIO())
    args = argparse.Namespace(no_progress=False, json=False)
    progress = filesrv_cli.TreeProgress("put t", 40 * MiB, 40, args)
    progress.enabled = True  # stderr is no terminal here; the bar's arithmetic is the same
    rates = []

    def batch_done() -> None:
        progress.file_progress(MiB, MiB)
        progress.file_done(type("R", (), {"skipped": False, "size": MiB, "bytes_moved": MiB,
                                          "as_dict": dict})())
        rate = progress.bar.format_dict["rate"]
        if rate is not None:
            rates.append(rate)

    with progress:
        for _ in range(8):
            now[0] += 0.25
            batch_done()
        progress.retrying(Reconnecting(1, 5, 0.5, "cut"))  # the batch under way is lost
        assert "reconnecting in 0.5 s (attempt 1 of 5)" in str(progress.bar)
        now[0] += 0.5 + 0.25  # the wait, then the batch sent again
        batch_done()
        assert "reconnecting" not in str(progress.bar)
        for _ in range(4):
            now[0] += 0.25
            batch_done()
    assert len(rates) >= 10
    assert max(rates) <= 4 * MiB * 1.01 and min(rates) >= 4 * MiB * 0.99, rates
