"""Inputs a user names are read only when they are files of a sane size: a device or a FIFO given as a
session or a recipe gets one line at once (it used to fill 22 GB or hang), and a YAML alias bomb is
refused before it expands."""

import os

import pytest


@pytest.mark.parametrize("command", [("replay",), ("recipe", "import")])
def test_a_device_is_refused_at_once(run_cli, command):
    r = run_cli(*command, "/dev/zero")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "/dev/zero: not a regular file" in r.stderr


@pytest.mark.parametrize("command", [("replay",), ("recipe", "import")])
def test_a_fifo_is_refused_without_waiting(run_cli, tmp_path, command):
    fifo = tmp_path / "input"
    os.mkfifo(fifo)
    r = run_cli(*command, fifo)  # a read would block forever: nobody writes to it
    assert r.returncode == 2 and "not a regular file" in r.stderr


def test_a_large_session_names_the_limit_and_how_to_raise_it(run_cli, tmp_path, monkeypatch):
    big = tmp_path / "s.json"
    big.write_text("{" + " " * 4096 + "}")
    monkeypatch.setenv("MOE_SURGEON_MAX_SESSION_BYTES", "1024")
    r = run_cli("replay", big)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "more than a session may be" in r.stderr and "MOE_SURGEON_MAX_SESSION_BYTES" in r.stderr


def test_a_yaml_alias_bomb_is_refused_before_it_expands(run_cli, tmp_path):
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")  # 9^9 strings once expanded
    r = run_cli("recipe", "import", bomb)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "YAML aliases expand to" in r.stderr and "refused before expanding" in r.stderr and len(r.stderr) < 400
