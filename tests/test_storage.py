"""The storage module on a real temporary root: confinement, partials, placement."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from filesrv.errors import (BadPath, IntegrityError, IoError, IsADirectory, NotADirectory,
                            NotFound)
from filesrv.storage import Storage


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "dir").mkdir()
    (r / "dir" / "inside.txt").write_bytes(b"inside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(b"secret")
    return r


def read(storage: Storage, *parts: str) -> bytes:
    f = storage.open_for_read(parts)
    try:
        return os.pread(f.fd, f.size, 0)
    finally:
        f.close()


def upload(storage: Storage, parts: tuple[str, ...], data: bytes, source: str = "s") -> None:
    up = storage.begin_upload(parts, len(data), source)
    try:
        up.write(memoryview(data)[up.resume_offset:])
        up.commit(xxhash.xxh3_128(data).hexdigest())
    finally:
        up.close()


def test_serve_creates_a_missing_root(tmp_path: Path):
    Storage(str(tmp_path / "new" / "root"))
    assert (tmp_path / "new" / "root").is_dir()


def test_symlink_inside_the_root_is_followed(root: Path):
    (root / "alias").symlink_to("dir")
    (root / "abs").symlink_to(root / "dir" / "inside.txt")
    s = Storage(str(root))
    assert read(s, "alias", "inside.txt") == b"inside"
    assert read(s, "abs") == b"inside"


@pytest.mark.parametrize("target,parts", [
    ("../outside", ("escape", "secret.txt")),
    ("../outside/secret.txt", ("escape",)),
    ("/etc", ("escape", "passwd")),
    ("dir/../../outside", ("escape", "secret.txt")),
])
def test_symlinks_leading_out_of_the_root_are_refused(root: Path, target: str, parts):
    (root / "escape").symlink_to(target)
    s = Storage(str(root))
    with pytest.raises(BadPath):
        read(s, *parts)
    with pytest.raises(BadPath):
        upload(s, ("escape", "new.bin"), b"x")
    assert sorted(os.listdir(root.parent / "outside")) == ["secret.txt"]


def test_symlink_into_the_state_directory_is_refused(root: Path):
    s = Storage(str(root))
    (root / "sneaky").symlink_to(".filesrv/partials")
    with pytest.raises(BadPath):
        s.list_dir(("sneaky",))


def test_listing_hides_state_and_escaping_symlinks(root: Path):
    (root / "escape").symlink_to("../outside")
    (root / "alias").symlink_to("dir")
    os.mkfifo(root / "fifo")
    s = Storage(str(root))
    names = {(e.name, e.type) for e in s.list_dir(())}
    assert names == {("dir", "dir"), ("alias", "dir")}


def test_fifo_is_refused_without_blocking(root: Path):
    os.mkfifo(root / "fifo")
    with pytest.raises(BadPath, match="not a regular file"):
        read(Storage(str(root)), "fifo")


def test_directory_where_a_file_is_expected_and_the_reverse(root: Path):
    s = Storage(str(root))
    with pytest.raises(IsADirectory):
        read(s, "dir")
    with pytest.raises(IsADirectory):
        upload(s, ("dir",), b"x")
    with pytest.raises(NotADirectory):
        upload(s, ("dir", "inside.txt", "x"), b"x")
    with pytest.raises(NotADirectory):
        s.list_dir(("dir", "inside.txt"))
    with pytest.raises(NotFound):
        read(s, "missing")
    assert (root / "dir" / "inside.txt").read_bytes() == b"inside"


def test_upload_creates_parents_and_places_atomically(root: Path):
    s = Storage(str(root))
    upload(s, ("a", "b", "c.bin"), b"payload")
    assert (root / "a" / "b" / "c.bin").read_bytes() == b"payload"
    assert os.listdir(root / ".filesrv" / "partials") == []


def test_digest_mismatch_discards_the_partial_and_places_nothing(root: Path):
    s = Storage(str(root))
    up = s.begin_upload(("x.bin",), 3, "s")
    up.write(memoryview(b"abc"))
    with pytest.raises(IntegrityError):
        up.commit("0" * 32)
    up.close()
    assert not (root / "x.bin").exists()
    assert os.listdir(root / ".filesrv" / "partials") == []


def test_unfinished_upload_resumes_from_its_partial(root: Path):
    s = Storage(str(root))
    data = os.urandom(10_000)
    first = s.begin_upload(("r.bin",), len(data), "v1")
    first.write(memoryview(data)[:4000])
    first.close()
    second = s.begin_upload(("r.bin",), len(data), "v1")
    assert second.resume_offset == 4000
    second.write(memoryview(data)[4000:])
    second.commit(xxhash.xxh3_128(data).hexdigest())
    second.close()
    assert (root / "r.bin").read_bytes() == data


def test_a_different_source_version_never_resumes_an_old_partial(root: Path):
    s = Storage(str(root))
    first = s.begin_upload(("r.bin",), 100, "v1")
    first.write(memoryview(b"x" * 50))
    first.close()
    other = s.begin_upload(("r.bin",), 100, "v2")
    assert other.resume_offset == 0
    other.close()


def test_digest_cache_is_keyed_by_file_identity(root: Path):
    s = Storage(str(root))
    path = root / "dir" / "inside.txt"
    f = s.open_for_read(("dir", "inside.txt"))
    assert s.digest_of(f) == xxhash.xxh3_128(b"inside").hexdigest()
    f.close()
    path.write_bytes(b"changed!")  # same inode, new size and mtime
    f = s.open_for_read(("dir", "inside.txt"))
    assert s.digest_of(f) == xxhash.xxh3_128(b"changed!").hexdigest()
    f.close()


def test_upload_to_a_symlink_inside_the_root_replaces_its_target(root: Path):
    (root / "alias.txt").symlink_to("dir/inside.txt")
    s = Storage(str(root))
    upload(s, ("alias.txt",), b"new contents")
    assert (root / "alias.txt").is_symlink()
    assert (root / "dir" / "inside.txt").read_bytes() == b"new contents"


def test_lacking_names_the_files_a_batch_must_send_and_the_names_that_cannot_take_one(
        root: Path, tmp_path: Path):
    storage = Storage(str(root))
    inside = xxhash.xxh3_128(b"inside").hexdigest()
    (root / "dir" / "link.txt").symlink_to("inside.txt")
    (root / "dir" / "escape.txt").symlink_to(tmp_path / "outside" / "secret.txt")
    (root / "dir" / "sub").mkdir()
    files = {
        0: (("dir", "inside.txt"), 6, inside),            # the same bytes: kept
        1: (("dir", "inside.txt"), 6, "0" * 32),          # other bytes: needed
        2: (("dir", "new.txt"), 6, inside),                # no file there: needed
        3: (("nodir", "deeper", "new.txt"), 6, inside),    # no parent yet: needed
        4: (("dir", "link.txt"), 6, inside),              # a link inside the root to it: kept
        5: (("dir", "sub"), 6, inside),                   # a directory: cannot
        6: (("dir", "inside.txt", "x"), 6, inside),       # under a file: cannot
        7: (("dir", "escape.txt"), 6, inside),            # a link out of the root: cannot
    }
    need, failed = storage.lacking(files, "identical")
    assert need == [1, 2, 3]
    assert isinstance(failed[5], IsADirectory) and isinstance(failed[6], NotADirectory)
    assert isinstance(failed[7], BadPath) and sorted(failed) == [5, 6, 7]
    need, failed = storage.lacking({0: files[1], 1: files[2]}, "existing")
    assert need == [1] and not failed  # any file at the name is kept


def test_a_directory_the_daemon_cannot_read_fails_the_listing_cleanly(root: Path, monkeypatch):
    # root reads every directory, so the refusal is simulated at the one call that lists
    (root / "dir" / "locked" / "deeper").mkdir(parents=True)
    storage = Storage(str(root))
    real_scandir = os.scandir

    def scandir(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(fd)

    monkeypatch.setattr(os, "scandir", scandir)
    open_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(IoError, match="listing a directory: Permission denied"):
        storage.list_dir((), recursive=True)
    assert len(os.listdir("/proc/self/fd")) == open_before  # no directory fd left open
    assert [e.name for e in storage.list_dir(("dir",))] == ["inside.txt", "locked"]


def test_the_sweep_prunes_digests_of_deleted_changed_or_moved_files_and_bounds_the_cache(
        root: Path):
    storage = Storage(str(root))
    digests = root / ".filesrv" / "digests"
    big = os.urandom(1024 * 1024)  # the cache keeps files of 1 MiB and more

    def hash_file(name: str) -> None:
        f = storage.open_for_read((name,))
        try:
            assert storage.digest_of(f) == xxhash.xxh3_128(big).hexdigest()
        finally:
            f.close()

    def cached() -> set[str]:
        return set(os.listdir(digests))

    def entry(name: str) -> str:
        st = (root / name).stat()
        return f"{st.st_dev:x}-{st.st_ino:x}"

    for name in ("kept", "deleted", "changed", "moved"):
        (root / name).write_bytes(big)
        hash_file(name)
    upload(storage, ("uploaded",), big)
    assert len(cached()) == 5
    (root / "orphan.123.tmp").write_bytes(b"{}")  # a write cut short, long ago
    os.rename(root / "orphan.123.tmp", digests / "orphan.123.tmp")
    os.utime(digests / "orphan.123.tmp", (1, 1))
    expected = {entry("kept"), entry("uploaded")}
    (root / "deleted").unlink()
    with open(root / "changed", "r+b") as fh:  # same inode, other bytes
        fh.write(b"new")
    os.rename(root / "moved", root / "elsewhere")
    assert storage.prune_digests() == 4
    assert cached() == expected

    for name in expected:
        os.utime(digests / name, (1, 1))  # written long ago
    for i in range(6):
        (root / f"f{i}").write_bytes(big)
        hash_file(f"f{i}")
        os.utime(digests / entry(f"f{i}"), (1000 + i, 1000 + i))  # written in this order
    assert len(cached()) == 8
    storage.prune_digests(max_entries=3)
    assert cached() == {entry("f3"), entry("f4"), entry("f5")}  # the newest three
