"""Atomic writes replace a file at its path: never a device, a FIFO or a directory, and a symlink only
by writing its regular target (the link stays a link, and a line says so)."""

import os
import stat

import pytest

from surgeon.errors import SurgeonError
from surgeon.io.atomic import write_atomic


def test_a_device_is_refused_and_left_as_it_was():
    before = os.stat("/dev/null")
    with pytest.raises(SurgeonError, match="/dev/null: is a character device, not a file"):
        write_atomic("/dev/null", b"session")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and os.stat("/dev/null").st_ino == before.st_ino


def test_a_fifo_is_refused_without_blocking_and_nothing_is_left(tmp_path):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    with pytest.raises(SurgeonError, match="is a FIFO"):
        write_atomic(fifo, b"{}")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and sorted(os.listdir(tmp_path)) == ["out.json"]


def test_a_symlink_to_a_file_writes_the_file_and_says_so(tmp_path, capsys):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_atomic(link, b"new")
    assert link.is_symlink() and real.read_text() == "new"
    assert f"{link} is a symlink: writing its target {real}" in capsys.readouterr().err


def test_a_symlink_to_a_fifo_is_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "samples.jsonl"
    link.symlink_to(fifo)
    with pytest.raises(SurgeonError, match="a symlink to .*pipe.*is a FIFO"):
        write_atomic(link, b"x")
    assert link.is_symlink() and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_the_cli_says_so_in_one_line(run_cli, tmp_path, donors_of):
    """`--save-session /dev/null`: the export target check passes, the session path is refused."""
    a, _ = donors_of("olmoe", 2)
    r = run_cli("export", tmp_path / "out", "--base", a, "--save-session", "/dev/null")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "/dev/null" in r.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
