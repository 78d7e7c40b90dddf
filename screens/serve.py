"""The workbench served to a browser: textual-serve runs the app's command per connection.

Closed by default: a page or socket is served only to whoever presents this start's token (printed
with the URL, as Jupyter does), and the socket refuses a browser connecting from another page's
origin, so a web page the user happens to visit cannot drive the workbench even on localhost.
"""

from __future__ import annotations

import hmac

from surgeon.errors import SurgeonError

INSTALL_HINT = "textual-serve is not installed: pip install 'moe-surgeon[serve]' (or: pip install textual-serve)"
REFUSED = "moe-surgeon serve: open the URL that `moe-surgeon serve` printed; it carries this start's token\n"


def make_server(command: str, host: str, port: int, token: str):
    try:
        import aiohttp_jinja2
        from aiohttp import web
        from textual_serve.server import Server
    except ImportError:
        raise SurgeonError(INSTALL_HINT) from None

    def _token_ok(given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), token.encode())

    class _Server(Server):
        async def _make_app(self):
            app = await super()._make_app()
            # The socket's URL carries the token in its path: the page's script appends its own query
            # (?width=..&height=..) to the URL it is given.
            app.router.add_get("/ws/{token}", self.handle_token_websocket)
            return app

        @aiohttp_jinja2.template("app_index.html")
        async def handle_index(self, request):
            if not _token_ok(request.query.get("token")):
                raise web.HTTPForbidden(text=REFUSED)
            # The page embeds the websocket URL: build it from the address the browser used, so a
            # port forwarded to another port (ssh -L 9000:localhost:8000) or a --public host works.
            self.public_url = f"{request.scheme}://{request.host}"
            context = await Server.handle_index.__wrapped__(self, request)
            context["app_websocket_url"] = context["app_websocket_url"] + "/" + token
            return context

        async def handle_websocket(self, request):
            raise web.HTTPForbidden(text=REFUSED)  # the plain /ws: no token, no workbench

        async def handle_token_websocket(self, request):
            if not _token_ok(request.match_info.get("token")):
                raise web.HTTPForbidden(text=REFUSED)
            origin = request.headers.get("Origin")
            if origin is not None and origin not in (f"http://{request.host}", f"https://{request.host}"):
                # A browser sends the page's origin: a socket opened by another site's page is refused.
                raise web.HTTPForbidden(text=f"moe-surgeon serve: connections from {origin} are refused\n")
            return await Server.handle_websocket(self, request)

        async def on_startup(self, app) -> None:
            pass  # cmd_serve prints the URL and the warning; textual-serve's banner says neither

    return _Server(command, host=host, port=port, title="moe-surgeon")
