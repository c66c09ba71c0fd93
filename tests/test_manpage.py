"""man/filesrv.1: generated from the parser and README.md, current, and rendered by man."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from conftest import REPO
from filesrv.cli import build_parser, load_config

MANPAGE = REPO / "man" / "filesrv.1"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_manpage", REPO / "man" / "make_manpage.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rendered(page: Path) -> subprocess.CompletedProcess[str]:
    """`man -l` as a reader runs it, 80 columns wide, with groff's warnings on."""
    man = shutil.which("man")
    if man is None:  # a failure, never a skip: .ci/run installs man-db
        pytest.fail("man not found: apt-get install man-db (as .ci/run does)")
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MANPAGER": "cat",
           "PAGER": "cat"}
    return subprocess.run([man, "--warnings", "-l", str(page)], capture_output=True,
                          text=True, env=env, timeout=60)


def test_the_manual_page_is_current():
    """The committed page is what the generator makes of today's parser and README."""
    assert MANPAGE.read_text(encoding="utf-8") == generator().generate(), (
        "man/filesrv.1 is not current: run python3 man/make_manpage.py")


def test_man_renders_the_page_without_warnings():
    proc = rendered(MANPAGE)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    headings = re.findall(r"^([A-Z][A-Z ]+)$", proc.stdout, re.M)
    assert headings == ["NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "CLIENT OPTIONS",
                        "TRANSFERS", "CONFIGURATION", "EXIT STATUS",
                        "RUNNING AS A SERVICE", "SECURITY", "SEE ALSO"]


def test_the_page_documents_every_command_and_option(tmp_path: Path):
    """Every command and every option of the parser is in the rendered page; an option
    added to the CLI shows up there once the page is regenerated."""
    text = rendered(MANPAGE).stdout
    parser = build_parser()
    commands = parser.commands.items()  # type: ignore[attr-defined]
    for name, command in [*commands, ("--version", parser)]:
        assert f"filesrv {name}" in text
        for action in command._actions:
            for option in action.option_strings:
                assert re.search(rf"(^|[\s,]){re.escape(option)}\b", text), (name, option)
    # the check sees a missing option: a page without --fsync fails it
    stripped = tmp_path / "filesrv.1"
    page = MANPAGE.read_text(encoding="utf-8")
    stripped.write_text(re.sub(r"\\-\\-fsync", "", page), encoding="utf-8")
    assert not re.search(r"(^|[\s,])--fsync\b", rendered(stripped).stdout)


def test_the_package_installs_the_page():
    """pip install puts man/filesrv.1 in PREFIX/share/man/man1, where man finds it for a
    PREFIX/bin on PATH (a venv's, /usr/local's)."""
    config = load_config(str(REPO / "pyproject.toml"))
    data_files = config["tool"]["setuptools"]["data-files"]
    assert data_files["share/man/man1"] == ["man/filesrv.1"]
