"""`moe-surgeon serve`: the same workbench in a browser, through textual-serve.

textual-serve runs one command per browser connection (here `python -m surgeon.cli DIR ...`, the
terminal workbench with Textual's web driver) and relays its screen over a websocket. Every
connection is a full workbench that can edit, save and export with this user's rights, so the
server binds to localhost unless `--public` says otherwise, and serves only whoever presents the
token printed with its URL (a new one each start; screens/serve.py checks it and the Origin).
"""

from __future__ import annotations

import ipaddress
import shlex
import sys
from pathlib import Path

from surgeon.errors import SurgeonError


def is_local_host(host: str) -> bool:
    """Only a loopback address (or the name `localhost`) keeps the port to this machine's users."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # any other host name may resolve to an outside interface
        return False


def app_command(dirs: list[str], session: str | None) -> str:
    """The shell command textual-serve starts per connection. textual-serve runs it through a
    shell, so every part is quoted; `exec` makes the workbench the shell's own process, so the quit
    textual-serve sends when a tab closes ends it; `--` keeps a donor named like a subcommand a donor."""
    parts = [sys.executable, "-m", "surgeon.cli"]
    if session:
        parts += ["--session", session]
    if dirs:
        parts += ["--", *dirs]
    return "exec " + shlex.join(parts)


def _check_inputs(dirs: list[str], session: str | None) -> tuple[list[str], str | None]:
    """Fail here, in the terminal, rather than in every browser tab: the donors open (headers
    only) and the session file exists. Paths become absolute so the app finds them whatever its
    working directory."""
    from surgeon.core.donor import DEMO_SCHEME, open_donor

    out = []
    for d in dirs:
        open_donor(d)
        out.append(d if d.startswith(DEMO_SCHEME) else str(Path(d).resolve()))
    if session is not None:
        p = Path(session)
        if not p.is_file():
            raise SurgeonError(f"{session}: no such session file")
        session = str(p.resolve())
    return out, session


def _check_can_listen(host: str, port: int) -> None:
    """Bind the address once, as the server will (SO_REUSEADDR, as aiohttp sets it), and let it go:
    a port in use or a host this machine does not have is one line now."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SurgeonError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise SurgeonError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None


def cmd_serve(args) -> int:
    if not args.public and not is_local_host(args.host):
        raise SurgeonError(
            f"--host {args.host}: not a local address; anyone who can reach it could edit and export "
            "with your rights. Add --public to serve it anyway"
        )
    if not 0 < args.port < 65536:
        raise SurgeonError(f"--port {args.port}: not a TCP port (1-65535)")
    dirs, session = _check_inputs(args.dirs, args.session)
    _check_can_listen(args.host, args.port)  # before the URL is printed: a URL nothing serves misleads
    from screens.serve import make_server  # the UI side, as cli/main.py starts the app

    import secrets

    token = secrets.token_urlsafe(24)  # a new one each start: the page and the socket require it
    server = make_server(app_command(dirs, session), args.host, args.port, token)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"moe-surgeon: serving the workbench on http://{shown}:{args.port}/?token={token} (ctrl+c stops it)")
    print(
        "moe-surgeon: warning: anyone who has this URL and can reach this port can open the workbench "
        "and edit, save and export models with your user's rights"
        + ("" if is_local_host(args.host) else f" (--public: reachable beyond this machine on {args.host})"),
        flush=True,
    )
    server.serve()
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="the workbench in a browser (textual-serve), on localhost by default")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="donor checkpoints (default: the demo donors)")
    p.add_argument("--session", metavar="FILE", help="open a saved session in each browser tab")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--public", action="store_true",
                   help="allow a non-local --host: anyone who can reach it can edit and export")
    p.set_defaults(func=cmd_serve)
