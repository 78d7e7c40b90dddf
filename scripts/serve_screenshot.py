"""Screenshot of `moe-surgeon serve` in a browser, for the README: docs/serve.png.

Starts the server on the demo donors on a free localhost port, opens the page in headless
Chromium (Debian: `apt-get install -y chromium`), and stops the server (and the workbench it
started for the browser) afterwards, whatever happened.

    python scripts/serve_screenshot.py [-o docs/serve.png] [--chromium PATH] [--wait-ms 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, server: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if server.poll() is not None:
            sys.exit(f"serve_screenshot: the server exited ({server.returncode}) before answering")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"serve_screenshot: {url} did not answer in {seconds:.0f} s")
            time.sleep(0.3)


async def shoot(debug_port: int, settle_s: float) -> bytes:
    """The page's PNG once the workbench has drawn: the served page marks its body `-first-byte`
    when the app's first output arrives; `settle_s` more lets the grid finish drawing."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        pages = []
        while not pages:  # the browser's DevTools endpoint comes up a moment after it starts
            try:
                async with session.get(f"http://127.0.0.1:{debug_port}/json/list") as r:
                    pages = [p for p in await r.json() if p.get("type") == "page"]
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
        async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids = iter(range(1, 1_000_000))

            async def call(method: str, **params):
                i = next(ids)
                await ws.send_json({"id": i, "method": method, "params": params})
                while True:
                    msg = await ws.receive_json()
                    if msg.get("id") == i:
                        return msg.get("result", {})

            probe = "document.body.classList.contains('-first-byte')"
            while not (await call("Runtime.evaluate", expression=probe, returnByValue=True))["result"].get("value"):
                await asyncio.sleep(0.3)
            await asyncio.sleep(settle_s)
            return base64.b64decode((await call("Page.captureScreenshot", format="png"))["data"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default=str(ROOT / "docs" / "serve.png"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser")
                    or shutil.which("google-chrome"))
    # After the first bytes, time for the grid to finish drawing (and the intro to fade out).
    ap.add_argument("--wait-ms", type=int, default=3000)
    ap.add_argument("--size", default="1200,800", help="window size WIDTH,HEIGHT in pixels")
    args = ap.parse_args()
    if not args.chromium:
        sys.exit("serve_screenshot: no chromium found (Debian: apt-get install -y chromium; or --chromium PATH)")

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "surgeon.cli", "serve", "demo:base", "demo:arith", "demo:reverse",
         "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,  # one process group: the server and the app it starts per browser
    )
    # The first line is the URL with this start's token (the page is refused without it).
    url = server.stdout.readline().split(" on ", 1)[-1].split()[0]
    out = Path(args.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        wait_for_page(url, server)
        with tempfile.TemporaryDirectory(prefix="serve-shot-") as profile:
            # A throwaway profile and no background traffic: the shot needs no network (the
            # page's web font falls back to a local monospace). Chromium's own --screenshot
            # fires at the page's load event, before the workbench (its own process, drawing over
            # the websocket) has drawn, and virtual time does not wait for a socket: the shot is
            # taken over the DevTools protocol once the page has its first bytes.
            debug_port = free_port()
            browser = subprocess.Popen(
                [args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", f"--window-size={args.size}", "--hide-scrollbars",
                 f"--remote-debugging-port={debug_port}", url],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            try:
                png = asyncio.run(asyncio.wait_for(shoot(debug_port, args.wait_ms / 1000), 120))
            finally:
                browser.terminate()
                try:
                    browser.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                try:  # its renderer and helper processes too
                    os.killpg(browser.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        out.write_bytes(png)
    finally:
        try:
            os.killpg(server.pid, signal.SIGINT)  # a clean stop first: the server quits its apps
            server.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
