"""The chat page at `/`: one self-contained HTML file shipped in the package, so a browser is the only client
a person needs to talk to `dsv3 serve`.

The page itself holds no secret and answers without the API key; the API calls it makes carry the key the
user types. Its script and styles are inline, so the Content-Security-Policy allows inline code and
same-origin requests and nothing else: no other site can be fetched from, framed into or loaded by it.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

PAGE = "static/chat.html"

CSP = "; ".join([
    "default-src 'none'",
    "script-src 'unsafe-inline'",
    "style-src 'unsafe-inline'",
    "connect-src 'self'",  # the page's fetch() calls: this server's API only
    "img-src data:",  # the inline icon
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",  # no other site may frame it and trick clicks out of it
])


def page_html() -> str:
    return resources.files("dsv3.serve").joinpath(PAGE).read_text(encoding="utf-8")


def add_page(app: FastAPI) -> None:
    """Serve the chat page at GET / (kept out of the OpenAPI schema: it is not part of the API)."""
    from fastapi.responses import HTMLResponse  # the serve extra: app.py says how to install it when missing

    html = page_html()  # read once: a missing file fails at start-up, not at the first visit
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
               "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(html, headers=headers)
