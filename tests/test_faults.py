"""Bad links on loopback: rig/faultproxy.py between the real CLI and the real daemon."""

from __future__ import annotations

import time

from conftest import cli, cli_json, random_file, start_cli, wait_for, xxh128_of


def test_client_reconnects_and_resumes_after_cut_connections(daemon, fault_proxy, tmp_path):
    proxy = fault_proxy(daemon.port, "--cut-after", "3M", "--cut-connections", "2")
    src = random_file(tmp_path / "cut.bin", 8 * 1024 * 1024)
    put = cli_json("put", "-s", proxy.address, str(src))
    assert put["resumed_from"] > 0  # the attempt that completed started mid-file
    assert xxh128_of(daemon.root / "cut.bin") == xxh128_of(src) == put["xxh128"]

    proxy2 = fault_proxy(daemon.port, "--cut-after", "3M", "--cut-connections", "2")
    got = cli_json("get", "-s", proxy2.address, "cut.bin", str(tmp_path / "back.bin"))
    assert got["resumed_from"] > 0
    assert xxh128_of(tmp_path / "back.bin") == xxh128_of(src)


def test_transfers_complete_through_latency_a_rate_cap_and_stalls(daemon, fault_proxy,
                                                                   tmp_path):
    proxy = fault_proxy(daemon.port, "--latency-ms", "5", "--rate", "16M",
                        "--stall-every", "2M", "--stall-seconds", "0.5")
    src = random_file(tmp_path / "slow.bin", 5 * 1024 * 1024 + 11)
    started = time.monotonic()
    cli("put", "-s", proxy.address, str(src))
    assert time.monotonic() - started > 0.3  # the faults really were in the way
    cli("get", "-s", proxy.address, "slow.bin", str(tmp_path / "back.bin"))
    assert xxh128_of(tmp_path / "back.bin") == xxh128_of(src) == xxh128_of(daemon.root /
                                                                            "slow.bin")


def test_client_gives_up_after_its_retries(daemon, fault_proxy, tmp_path):
    proxy = fault_proxy(daemon.port, "--cut-after", "1M", "--cut-connections", "1000")
    src = random_file(tmp_path / "never.bin", 4 * 1024 * 1024)
    started = time.monotonic()
    r = cli("put", "-s", proxy.address, "--retries", "2", str(src), check=False)
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert 1.4 < time.monotonic() - started < 30  # waited 0.5 s + 1 s between attempts
    assert not (daemon.root / "never.bin").exists()


def test_client_rides_out_a_daemon_restart_on_the_same_port(daemon_factory, tmp_path):
    daemon = daemon_factory()
    src = random_file(tmp_path / "r.bin", 16 * 1024 * 1024)
    put = start_cli("put", "-s", daemon.address, "--limit-rate", "4M", "--json", str(src))
    wait_for(lambda: any(p.stat().st_size > 1024 * 1024
                         for p in (daemon.root / ".filesrv" / "partials").glob("*.part")),
             what="the upload to be under way")
    port = daemon.port
    daemon.crash()
    again = daemon_factory("--port", str(port), root=daemon.root)  # --port given twice: last wins
    assert again.port == port
    assert put.wait(timeout=60) == 0, put.stderr.read()
    import json
    result = json.loads(put.stdout.read())
    assert result["resumed_from"] > 0 and result["xxh128"] == xxh128_of(src)
    assert xxh128_of(again.root / "r.bin") == xxh128_of(src)


def test_tree_transfers_ride_out_connections_cut_in_the_middle_of_a_batch(daemon, fault_proxy,
                                                                          tmp_path):
    src = tmp_path / "src"
    for i in range(400):  # ~8 MiB of small files: a batch or two, cut in the middle
        random_file(src / f"d{i % 4}" / f"f{i:03d}.bin", 20_000 + i)
    proxy = fault_proxy(daemon.port, "--cut-after", "3M", "--cut-connections", "2")
    cli("put", "-s", proxy.address, "-r", str(src), "t")
    expected = {p.relative_to(src): xxh128_of(p) for p in src.rglob("*") if p.is_file()}
    landed = {p.relative_to(daemon.root / "t"): xxh128_of(p)
              for p in (daemon.root / "t").rglob("*") if p.is_file()}
    assert landed == expected
    assert list((daemon.root / ".filesrv" / "partials").iterdir()) == []
    batches = [line for line in daemon.log_text().splitlines() if " put_files " in line]
    assert any(not line.endswith(" ok") for line in batches), batches  # a batch was cut

    proxy2 = fault_proxy(daemon.port, "--cut-after", "3M", "--cut-connections", "2")
    cli("get", "-s", proxy2.address, "-r", "t", str(tmp_path / "copy"))
    copied = {p.relative_to(tmp_path / "copy"): xxh128_of(p)
              for p in (tmp_path / "copy").rglob("*") if p.is_file()}
    assert copied == expected
