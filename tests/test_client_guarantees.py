"""The client never splices, never replaces what is not a file, and downloads every name.

Real daemons on loopback, the real CLI as a subprocess, real files changed under it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from conftest import cli, cli_json, kill_when, random_file, start_cli, wait_for, xxh128_of
from filesrv.trees import read_small_file
from filesrv.local import NAME_MAX, partial_name
from filesrv.errors import SourceChanged

SLOW = "2M"  # bytes per second while a test acts mid-transfer
BIG = 4 * 1024 * 1024  # large enough to travel alone (not in a batch) and to resume

# ---------------------------------------------------------------- long names

LONGEST = "é" * 127 + "z"  # 255 bytes in UTF-8: the longest name a server can hold


def local_partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".filesrv-part")]


def test_partial_names_fit_name_max_and_are_stable():
    for name in (LONGEST, "a" * 255, "a" * 232, "a" * 233, "x" * 199 + "é" * 28):
        partial = partial_name(name)
        assert len(os.fsencode(partial + ".json.tmp")) <= NAME_MAX, name
        assert partial == partial_name(name)  # a resume finds the same partial
        assert partial.startswith(".") and partial.endswith(".filesrv-part")
        partial.encode("utf-8")  # not cut inside a character
    assert partial_name("a" * 254 + "b") != partial_name("a" * 254 + "c")
    assert partial_name("short.iso") == ".short.iso.filesrv-part"  # unchanged when it fits


def test_every_name_the_server_holds_downloads(daemon, tmp_path: Path):
    small = random_file(daemon.root / "tree" / LONGEST, 1000)
    big = random_file(daemon.root / "tree" / ("b" * 255), BIG)
    out = tmp_path / "out"
    out.mkdir()
    for source in (small, big):
        got = cli_json("get", "-s", daemon.address, f"tree/{source.name}", str(out) + "/")
        assert got["xxh128"] == xxh128_of(source) == xxh128_of(out / source.name)
    cli("get", "-r", "-s", daemon.address, "tree", str(tmp_path / "copy"))
    for source in (small, big):
        assert xxh128_of(tmp_path / "copy" / source.name) == xxh128_of(source)
    assert local_partials(out) == [] and local_partials(tmp_path / "copy") == []


def test_a_download_with_the_longest_name_resumes(daemon, tmp_path: Path):
    source = random_file(daemon.root / LONGEST, BIG)
    out = tmp_path / "out"
    out.mkdir()
    proc = start_cli("get", "-s", daemon.address, "--limit-rate", SLOW, LONGEST, str(out) + "/")
    kill_when(proc, lambda: sum(p.stat().st_size for p in local_partials(out)) > 1024 * 1024,
              "the local partial to grow")
    assert not (out / LONGEST).exists()
    got = cli_json("get", "-s", daemon.address, LONGEST, str(out) + "/")
    assert got["resumed_from"] > 0
    assert got["xxh128"] == xxh128_of(source) == xxh128_of(out / LONGEST)
    assert local_partials(out) == []


# ---------------------------------------------------------------- a source that changes

def server_partials(daemon) -> dict[str, int]:
    """name -> size of every partial upload on the server."""
    found = {}
    for p in (daemon.root / ".filesrv" / "partials").glob("*.part"):
        try:
            found[p.name] = p.stat().st_size
        except FileNotFoundError:
            pass
    return found


def grown_partial(daemon, ignore: set[str]):
    """A condition: a partial not in `ignore` holds more than 1 MiB."""
    return lambda: any(size > 1024 * 1024 for name, size in server_partials(daemon).items()
                       if name not in ignore)


def rewrite_in_place(path: Path, content: bytes) -> None:
    """Overwrite path's bytes without a new inode, as an editor saving in place does."""
    with open(path, "r+b") as fh:
        fh.write(content)


def rewrite_when(proc, reached, path: Path, content: bytes, what: str) -> None:
    """Rewrite `path` once `reached()` holds, while `proc` still runs (bounded in time)."""
    wait_for(lambda: reached() or proc.poll() is not None, what=what)
    assert proc.poll() is None, f"the command finished before {what}"
    rewrite_in_place(path, content)


def finish(proc) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_a_put_whose_source_is_rewritten_uploads_the_new_version_never_a_splice(
        daemon, tmp_path: Path):
    src = tmp_path / "doc.bin"
    old, new = os.urandom(BIG), os.urandom(BIG)
    src.write_bytes(old)
    proc = start_cli("put", "-s", daemon.address, "--limit-rate", SLOW, "--json", str(src),
                     "doc.bin")
    rewrite_when(proc, grown_partial(daemon, set()), src, new, "the upload is under way")
    status, out, err = finish(proc)
    # the change is seen before the commit: the upload starts over, once, from the new bytes
    assert status == 0, err
    assert (daemon.root / "doc.bin").read_bytes() == new
    assert json.loads(out)["xxh128"] == xxh128_of(src)


def test_a_source_that_keeps_changing_fails_with_its_own_status_and_places_nothing(
        daemon, tmp_path: Path):
    src = tmp_path / "doc.bin"
    src.write_bytes(os.urandom(BIG))
    proc = start_cli("put", "-s", daemon.address, "--limit-rate", SLOW, str(src), "doc.bin")
    rewrite_when(proc, grown_partial(daemon, set()), src, os.urandom(BIG),
                 "the first upload is under way")
    first = set(server_partials(daemon))
    rewrite_when(proc, grown_partial(daemon, first), src, os.urandom(BIG),
                 "the upload started over")
    status, _, err = finish(proc)
    assert status == 12, err
    assert err.count("\n") == 1 and "source changed during transfer" in err, err
    assert "Traceback" not in err
    assert not (daemon.root / "doc.bin").exists()


def test_a_resumed_put_whose_source_is_rewritten_is_never_spliced(daemon, tmp_path: Path):
    src = tmp_path / "doc.bin"
    old, new = os.urandom(BIG), os.urandom(BIG)
    src.write_bytes(old)
    first = start_cli("put", "-s", daemon.address, "--limit-rate", SLOW, str(src), "doc.bin")
    kill_when(first, grown_partial(daemon, set()), "the first upload to be under way")
    cut = max(server_partials(daemon).values())
    proc = start_cli("put", "-s", daemon.address, "--limit-rate", SLOW, "--json", str(src),
                     "doc.bin")
    rewrite_when(proc, lambda: max(server_partials(daemon).values()) > cut + 1024 * 1024,
                 src, new, "the resumed upload is under way")
    status, out, err = finish(proc)
    assert status == 0, err
    assert (daemon.root / "doc.bin").read_bytes() == new
    assert json.loads(out)["resumed_from"] == 0  # the new version does not resume the old


def test_a_tree_whose_large_file_is_rewritten_is_never_spliced(daemon, tmp_path: Path):
    tree = tmp_path / "tree"
    small = random_file(tree / "small.txt", 1000)
    big = tree / "big.bin"
    new = os.urandom(BIG)
    big.write_bytes(os.urandom(BIG))
    proc = start_cli("put", "-r", "-s", daemon.address, "--limit-rate", SLOW, str(tree),
                     "tree")
    rewrite_when(proc, grown_partial(daemon, set()), big, new, "the large file is under way")
    status, _, err = finish(proc)
    assert status == 0, err
    assert (daemon.root / "tree" / "big.bin").read_bytes() == new
    assert xxh128_of(daemon.root / "tree" / "small.txt") == xxh128_of(small)


REWRITER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
stalls = open(sys.argv[3], "a", buffering=1)
try:  # rarely paused mid-write by other tasks: a paused write leaves a real mixed state
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
except OSError:
    pass
versions = [bytes([c]) * int(sys.argv[2]) for c in b"AB"]
end = time.monotonic() + 20
while time.monotonic() < end:  # each version in one write(2), as a program saving it would
    for version in versions:
        began = time.monotonic_ns()
        os.pwrite(fd, version, 0)
        ended = time.monotonic_ns()
        if ended - began > STALL_NS:  # the file really held a mix for this long
            stalls.write(f"{began} {ended}\\n")
        time.sleep(0.0005)
"""
STALL_NS = 2_000_000  # a 1 MiB write into the page cache takes ~0.2 ms here


def test_a_small_file_rewritten_while_batched_is_read_as_one_version(tmp_path: Path):
    """put -r reads small files whole into its batches; a rewrite racing the read must
    give the old bytes, the new ones, or SourceChanged, never a mix (without the check,
    several reads in a hundred are torn here).

    The file is made in 4 KiB writes, so its page cache is in small pages that a reader
    can see half rewritten. A write that the scheduler pauses halfway (the rewriter runs
    real-time where it may, but a loaded machine still pauses it now and then) leaves
    the file really holding a mix for that long: a version of the file no reader can
    tell from another, which the README names as the limit of the guarantee. The
    rewriter reports each such pause; only a mixed read that overlaps one is excused.
    """
    size = 1024 * 1024
    path = tmp_path / "small.bin"
    stalls_file = tmp_path / "stalls"
    stalls_file.touch()
    with open(path, "wb") as fh:
        for _ in range(size // 4096):
            fh.write(b"A" * 4096)
    versions = {b"A" * size, b"B" * size}
    rewriter = REWRITER.replace("STALL_NS", str(STALL_NS))
    writer = subprocess.Popen([sys.executable, "-c", rewriter, str(path), str(size),
                               str(stalls_file)])
    mixed: list[tuple[int, int]] = []
    try:
        wait_for(lambda: path.read_bytes()[:1] == b"B", what="the rewriter to start")
        refused = 0
        for _ in range(1000):
            began = time.monotonic_ns()
            try:
                body = read_small_file(str(path))
            except SourceChanged:
                refused += 1
                continue
            if body not in versions:
                mixed.append((began, time.monotonic_ns()))
    finally:
        writer.kill()
        writer.wait(timeout=10)
    stalls = [tuple(map(int, line.split())) for line in stalls_file.read_text().split("\n")
              if line]
    unexplained = [read for read in mixed
                   if not any(s < read[1] and read[0] < e for s, e in stalls)]
    assert not unexplained, (f"{len(unexplained)} of 1000 reads mixed two versions while "
                             f"no write was paused ({refused} refused, {len(mixed)} mixed "
                             f"in all, {len(stalls)} paused writes)")


# ---------------------------------------------------------------- what is at the destination

def drain(path: Path) -> "tuple[threading.Thread, list[bytes]]":
    """A reader of the FIFO at path, collecting what it gets until the writer closes."""
    import threading
    got: list[bytes] = []

    def read() -> None:
        with open(path, "rb") as fh:
            got.append(fh.read())
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, got


def test_a_fifo_at_the_destination_is_written_through_and_stays_a_fifo(daemon, tmp_path: Path):
    source = random_file(daemon.root / "big.bin", BIG)
    (tmp_path / "out").mkdir()
    fifo = tmp_path / "out" / "fifo"
    os.mkfifo(fifo)
    reader, got = drain(fifo)
    done = cli_json("get", "-s", daemon.address, "big.bin", str(fifo))
    reader.join(timeout=30)
    assert got and got[0] == source.read_bytes()
    assert done["xxh128"] == xxh128_of(source)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in fifo.parent.iterdir()] == ["fifo"]  # no partial beside it


def test_a_character_device_at_the_destination_is_written_through_never_replaced(
        daemon, tmp_path: Path):
    random_file(daemon.root / "small.bin", 1000)
    (tmp_path / "out").mkdir()
    null = tmp_path / "out" / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a null device of our own
    cli("get", "-s", daemon.address, "small.bin", str(null))
    st = os.lstat(null)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert [p.name for p in null.parent.iterdir()] == ["null"]


def test_a_socket_at_the_destination_is_refused_and_kept(daemon, tmp_path: Path):
    import socket
    random_file(daemon.root / "small.bin", 1000)
    path = tmp_path / "sock"
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(path))
        proc = cli("get", "-s", daemon.address, "small.bin", str(path), check=False)
    finally:
        listener.close()
    assert proc.returncode == 9, proc.stderr
    assert proc.stderr.count("\n") == 1 and "is a socket" in proc.stderr
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_symlink_at_the_destination_has_its_target_replaced_and_stays_a_link(
        daemon, tmp_path: Path):
    source = random_file(daemon.root / "big.bin", BIG)
    target = tmp_path / "real" / "file.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    cli("get", "-s", daemon.address, "big.bin", str(link))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert xxh128_of(target) == xxh128_of(source)
    assert local_partials(tmp_path) == [] and local_partials(target.parent) == []


def test_a_dangling_symlink_at_the_destination_is_refused_and_kept(daemon, tmp_path: Path):
    random_file(daemon.root / "small.bin", 1000)
    link = tmp_path / "link.bin"
    link.symlink_to(tmp_path / "nowhere" / "file.bin")
    proc = cli("get", "-s", daemon.address, "small.bin", str(link), check=False)
    assert proc.returncode == 9 and "dangling symlink" in proc.stderr, proc.stderr
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_link_to_standard_output_receives_the_bytes_and_the_report_goes_to_stderr(
        daemon, tmp_path: Path):
    """What `get FILE /dev/stdout | cmd` does, with a link of our own to /proc/self/fd/1
    (the real /dev/stdout is never at stake in a test)."""
    from conftest import CLI, ENV
    source = random_file(daemon.root / "big.bin", BIG)
    stdout = tmp_path / "stdout"
    stdout.symlink_to("/proc/self/fd/1")
    proc = subprocess.run([*CLI, "get", "-s", daemon.address, "big.bin", str(stdout)],
                          env=ENV, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == source.read_bytes()
    assert b"downloaded big.bin" in proc.stderr
    assert stdout.is_symlink()


def test_a_tree_download_never_replaces_a_fifo_in_the_way(daemon, tmp_path: Path):
    for name, size in (("a.txt", 100), ("b.bin", BIG)):  # in a batch, and on its own
        random_file(daemon.root / name / "tree" / name, size)
        copy = tmp_path / name
        copy.mkdir()
        os.mkfifo(copy / name)
        proc = cli("get", "-r", "-s", daemon.address, f"{name}/tree", str(copy), check=False)
        assert proc.returncode == 9 and "FIFO" in proc.stderr, proc.stderr
        assert stat.S_ISFIFO(os.lstat(copy / name).st_mode)


def test_a_download_into_a_fifo_resumes_after_a_cut_without_repeating_bytes(
        daemon, fault_proxy, tmp_path: Path):
    source = random_file(daemon.root / "big.bin", 8 * 1024 * 1024)
    proxy = fault_proxy(daemon.port, "--cut-after", "3M", "--cut-connections", "2")
    (tmp_path / "out").mkdir()
    fifo = tmp_path / "out" / "fifo"
    os.mkfifo(fifo)
    reader, got = drain(fifo)
    done = cli_json("get", "-s", proxy.address, "big.bin", str(fifo))
    reader.join(timeout=30)
    assert done["reconnects"] >= 1
    assert got and got[0] == source.read_bytes()  # each byte once, in order
