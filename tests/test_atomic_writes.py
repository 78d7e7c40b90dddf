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


def test_no_output_reaches_a_donor_file_through_a_link(run_cli, tmp_path, donors_of):
    """A donor whose shard is a link into an old export of ours: `export OLD --force` would replace
    the donor's bytes, and a session or samples path linked to a donor file would overwrite it."""
    import shutil

    a, b = (shutil.copytree(d, tmp_path / f"d{i}") for i, d in enumerate(donors_of("olmoe", 2)))
    old = tmp_path / "old"
    assert run_cli("export", old, "--base", a, "--take", f"experts={b}").returncode == 0
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in os.listdir(a):
        if f != "model.safetensors":
            shutil.copy(os.path.join(a, f), linked / f)
    (linked / "model.safetensors").symlink_to(old / "model.safetensors")
    before = (old / "model.safetensors").read_bytes()

    r = run_cli("export", old, "--base", linked, "--take", f"experts={b}", "--force")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "through a link" in r.stderr
    assert (old / "model.safetensors").read_bytes() == before

    config = tmp_path / "session-link.json"
    config.symlink_to(os.path.join(a, "config.json"))
    was = config.read_bytes()
    r = run_cli("export", tmp_path / "new", "--base", a, "--take", f"experts={b}", "--save-session", config)
    assert r.returncode == 2 and "which this run reads" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert config.read_bytes() == was and not (tmp_path / "new").exists()
