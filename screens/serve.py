"""The workbench served to a browser: textual-serve runs the app's command per connection."""

from __future__ import annotations

from surgeon.errors import SurgeonError

INSTALL_HINT = "textual-serve is not installed: pip install 'moe-surgeon[serve]' (or: pip install textual-serve)"


def make_server(command: str, host: str, port: int):
    try:
        from textual_serve.server import Server
    except ImportError:
        raise SurgeonError(INSTALL_HINT) from None

    class _Server(Server):
        async def handle_index(self, request):
            # The page embeds the websocket URL: build it from the address the browser used, so a
            # port forwarded to another port (ssh -L 9000:localhost:8000) or a --public host works.
            self.public_url = f"{request.scheme}://{request.host}"
            return await super().handle_index(request)

        async def on_startup(self, app) -> None:
            pass  # cmd_serve prints the URL and the warning; textual-serve's banner says neither

    return _Server(command, host=host, port=port, title="moe-surgeon")
