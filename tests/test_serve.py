"""`moe-surgeon serve`: the workbench in a browser through textual-serve, on localhost by default."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from surgeon.cli.serve import app_command, is_local_host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_only_loopback_hosts_are_local():
    assert all(map(is_local_host, ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"]))
    assert not any(map(is_local_host, ["0.0.0.0", "::", "192.168.1.5", "example.org"]))


def test_a_non_local_host_needs_public(run_cli):
    r = run_cli("serve", "--host", "0.0.0.0", "--port", _free_port())
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "--public" in r.stderr and "0.0.0.0" in r.stderr


def test_bad_donor_or_session_fails_before_serving(run_cli, tmp_path):
    r = run_cli("serve", tmp_path / "nothing-here", "--port", _free_port())
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nothing-here" in r.stderr
    r = run_cli("serve", "--session", tmp_path / "gone.json", "--port", _free_port())
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "gone.json" in r.stderr


def test_without_textual_serve_one_line_says_how_to_install(run_cli, monkeypatch):
    # A None entry in sys.modules is how Python itself marks a module as unimportable.
    monkeypatch.setitem(sys.modules, "textual_serve", None)
    monkeypatch.setitem(sys.modules, "textual_serve.server", None)
    r = run_cli("serve", "--port", _free_port())
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pip install" in r.stderr and "moe-surgeon[serve]" in r.stderr


def test_the_command_is_quoted_for_the_shell_textual_serve_uses(tmp_path):
    odd = tmp_path / "a donor; rm -rf x"
    cmd = app_command([str(odd), "inspect"], str(tmp_path / "s 1.json"))
    out = subprocess.run(["sh", "-c", cmd.replace("exec ", "printf '%s\\n' ", 1)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [sys.executable, "-m", "surgeon.cli", "--session", str(tmp_path / "s 1.json"), "--", str(odd), "inspect"]


@pytest.mark.slow
def test_served_page_and_websocket_answer_on_localhost_and_ctrl_c_stops_it():
    aiohttp = pytest.importorskip("aiohttp")
    pytest.importorskip("textual_serve")
    port = _free_port()
    # Its own session (process group): whatever happens, the server and every app it started die.
    server = subprocess.Popen(
        [sys.executable, "-m", "surgeon.cli", "serve", "demo:base", "demo:arith", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        page = None
        while page is None:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server never answered"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    assert resp.status == 200
                    page = resp.read().decode()
            except OSError:
                time.sleep(0.3)
        assert f"ws://127.0.0.1:{port}/ws" in page and "moe-surgeon" in page

        async def first_screen() -> str:
            got = ""
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(f"ws://127.0.0.1:{port}/ws?width=120&height=40") as ws:
                    # The grid (donors in its header, the expert column) means the workbench itself
                    # runs behind the socket, not an error page; escape sequences aside.
                    while not all(w in re.sub(r"\x1b\[[0-9;?$]*[A-Za-z]", "", got)
                                  for w in ("demo:arith", "layer", "experts")):
                        msg = await ws.receive(timeout=90)
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            got += msg.data
                        elif msg.type == aiohttp.WSMsgType.BINARY:
                            got += msg.data.decode("utf-8", "replace")
                        else:
                            raise AssertionError(f"the socket ended first ({msg.type}): {got[-2000:]!r}")
            return got

        screen = asyncio.run(asyncio.wait_for(first_screen(), 120))
        assert "\x1b[" in screen  # a terminal screen, drawn with escape sequences

        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=30)
        assert server.returncode == 0, out
        assert f"http://127.0.0.1:{port}/" in out and "anyone who can reach this port" in out
    finally:
        try:  # the group, not only the server: an app it started may outlive it
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=10)
