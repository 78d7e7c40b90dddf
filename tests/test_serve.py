"""`moe-surgeon serve`: the workbench in a browser through textual-serve, on localhost by default."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

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


def test_a_port_in_use_is_one_line_and_no_url_is_printed(run_cli):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = run_cli("serve", "--port", port)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"127.0.0.1:{port}" in r.stderr
    assert "serving" not in r.stdout and "token" not in r.stdout


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


@contextmanager
def served(*args, env=None):
    """`moe-surgeon serve ARGS` on a free localhost port, up and answering; yields (server, port).
    Its own session (process group): whatever happens, the server and every app it started die."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "surgeon.cli", "serve", *map(str, args), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        # Printed before the port is bound: the URL with its token, then the warning. Read here, as
        # lines: a later communicate() reads the pipe itself and would miss what readline buffered.
        server.banner = server.stdout.readline() + server.stdout.readline()
        found = re.search(r"\?token=(\S+)", server.banner)
        assert found, server.banner + server.stdout.read()
        server.token = found.group(1)
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server never answered"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/?token={server.token}", timeout=5) as resp:
                    assert resp.status == 200
                    server.page = resp.read().decode()
                    break
            except OSError:
                time.sleep(0.3)
        server.ws_url = re.search(r'data-session-websocket-url="([^"]+)"', server.page).group(1)
        yield server, port
    finally:
        try:  # the group, not only the server: an app it started may outlive it
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=10)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?$]*[A-Za-z]", "", text)


async def _drive(aiohttp, ws_url: str, until_seen: tuple[str, ...], keys: list[str] = (), then=None) -> str:
    """Open the app's socket (the URL the served page gives), wait until the screen shows every word of
    `until_seen`, type `keys` (raw terminal input, as the browser's terminal sends it), and wait for
    `then()` to hold."""
    got = ""
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"{ws_url}?width=120&height=40") as ws:

            async def read_one():
                nonlocal got
                msg = await ws.receive(timeout=90)
                if msg.type == aiohttp.WSMsgType.TEXT:
                    got += msg.data
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    got += msg.data.decode("utf-8", "replace")
                else:
                    raise AssertionError(f"the socket ended first ({msg.type}): {got[-2000:]!r}")

            while not all(w in _plain(got) for w in until_seen):
                await read_one()
            for key in keys:
                await ws.send_json(["stdin", key])
                await asyncio.sleep(0.3)
            deadline = time.monotonic() + 60
            while then is not None and not then():
                assert time.monotonic() < deadline, f"never happened; screen: {_plain(got)[-1500:]!r}"
                try:
                    await asyncio.wait_for(read_one(), 0.5)
                except asyncio.TimeoutError:
                    pass
    return got


@pytest.mark.slow
def test_served_page_and_websocket_answer_on_localhost_and_ctrl_c_stops_it():
    aiohttp = pytest.importorskip("aiohttp")
    pytest.importorskip("textual_serve")
    with served("demo:base", "demo:arith") as (server, port):
        assert server.ws_url == f"ws://127.0.0.1:{port}/ws/{server.token}" and "moe-surgeon" in server.page
        # The grid (donors in its header, the expert column) means the workbench itself runs behind
        # the socket, not an error page; escape sequences aside.
        screen = asyncio.run(asyncio.wait_for(_drive(aiohttp, server.ws_url, ("demo:arith", "layer", "experts")), 120))
        assert "\x1b[" in screen  # a terminal screen, drawn with escape sequences

        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=30)
        assert server.returncode == 0, out
        assert "anyone who has this URL and can reach this port" in server.banner


@pytest.mark.slow
def test_a_session_saved_in_the_browser_is_the_one_saved_in_the_terminal(tmp_path):
    """The same keys, typed into the served workbench and into the terminal one, save the same file."""
    aiohttp = pytest.importorskip("aiohttp")
    pytest.importorskip("textual_serve")
    from screens.app import SurgeonApp
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Plan
    from surgeon.core.session import load_session, make_session, save_session

    donors = {n: open_donor(s) for n, s in zip("ABC", ["demo:base", "demo:arith", "demo:reverse"])}
    web, term = tmp_path / "web.json", tmp_path / "term.json"
    for path in (web, term):
        save_session(make_session(Plan("A"), donors, path), path)
    keys = ["2", "j", "3", "\x13"]  # layer 0 attention -> B, layer 1 attention -> C, ctrl+s

    with served("--session", web, env={"MOE_SURGEON_STATE_DIR": str(tmp_path / "state-web")}) as (server, _):
        asyncio.run(asyncio.wait_for(_drive(aiohttp, server.ws_url, ("demo:arith", "layer", "experts"), keys,
                                            then=lambda: load_session(web).plan.assignments), 180))

    async def in_terminal():
        app = SurgeonApp(None, str(term), state_dir=tmp_path / "state-term", offer_recovery=False)
        async with app.run_test(size=(120, 40)) as pilot:
            for _ in range(3):
                await app.workers.wait_for_complete()
                await pilot.pause()
            await pilot.press("2", "j", "3", "ctrl+s")
            for _ in range(3):
                await app.workers.wait_for_complete()
                await pilot.pause()

    asyncio.run(in_terminal())
    a, b = load_session(web), load_session(term)
    assert a.plan.assignments and a.plan == b.plan
    assert [(d.name, d.path, d.fingerprint) for d in a.donors] == [(d.name, d.path, d.fingerprint) for d in b.donors]
    first, second = json.loads(web.read_text()), json.loads(term.read_text())
    differ = {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)}
    assert differ <= {"saved_at", "updated", "created"}, {k: (first.get(k), second.get(k)) for k in differ}


@pytest.mark.slow
def test_the_page_and_the_socket_need_this_starts_token_and_refuse_other_origins():
    """What a web page the user visits could try: load the page, open the socket without the token,
    with a wrong one, or with the right one from its own origin. All refused; nothing runs."""
    aiohttp = pytest.importorskip("aiohttp")
    pytest.importorskip("textual_serve")
    import urllib.error

    with served("demo:base") as (server, port):
        for query in ("", "?token=", "?token=wrong"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/{query}", timeout=10)
            assert e.value.code == 403

        async def attempt(url, headers=None):
            async with aiohttp.ClientSession() as s:
                try:
                    async with s.ws_connect(url, headers=headers or {}):
                        return "connected"
                except aiohttp.WSServerHandshakeError as e:
                    return e.status

        base = f"ws://127.0.0.1:{port}"
        assert asyncio.run(attempt(f"{base}/ws?width=80&height=24")) == 403
        assert asyncio.run(attempt(f"{base}/ws/wrong?width=80&height=24")) == 403
        assert asyncio.run(attempt(f"{server.ws_url}?width=80&height=24", {"Origin": "https://evil.example"})) == 403
        assert asyncio.run(attempt(f"{server.ws_url}?width=80&height=24",
                                   {"Origin": f"http://127.0.0.1:{port}"})) == "connected"
