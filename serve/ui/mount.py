"""The browser UI on the gateway's app: Gradio mounted at ``/``, behind its logins or,
without any, for loopback clients only (as the API is without keys).

    mount_ui(app, gateway, users=(("alice", "pw"),))
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from feedback import settings
from serve.gateway import auth
from serve.gateway.core import Gateway

log = logging.getLogger(__name__)

# The gateway's own routes: they check keys themselves.
API_PREFIXES = ("/v1/", "/admin/", "/health", "/metrics")


class LoopbackUI:
    """Plain ASGI middleware: without UI logins, only loopback clients reach the UI (the API
    routes check keys themselves). Plain ASGI, so API requests pay one string check."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["path"].startswith(API_PREFIXES):
            client = scope.get("client")
            if not auth.is_loopback(client[0] if client else None):
                response = PlainTextResponse("The browser UI serves loopback clients only; set PERSONA_UI_USERS "
                                             "to log in from elsewhere.", status_code=403)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def mount_ui(app: FastAPI, gateway: Gateway, users: tuple[tuple[str, str], ...]) -> None:
    import gradio as gr

    from serve.ui.app import build_ui

    if not users:
        log.warning("PERSONA_UI_USERS is not set: the browser UI serves loopback clients only, without login")
        app.add_middleware(LoopbackUI)

    blocks = build_ui(gateway).queue(default_concurrency_limit=gateway.config.max_in_flight,
                                     max_size=settings.get("PERSONA_UI_QUEUE_SIZE"))
    # The UI's events are not an API (the OpenAI API is): private keeps them out of Gradio's API
    # description, which its login page embeds for anyone (persona names, defaults, even with
    # ?all_endpoints=true), and out of its run history.
    for fn in blocks.fns.values():
        fn.api_visibility = "private"
    # blocked_paths: Gradio's file route must never serve the database, adapters or keys, whatever
    # a component points at (it serves only its own upload and cache folders already).
    # max_file_size: its upload route takes files from anyone who reaches the UI, though no
    # component of ours asks for one.
    gr.mount_gradio_app(app, blocks, path="/", auth=list(users) or None, footer_links=[], show_error=True,
                        blocked_paths=[str(settings.home())], auth_message="persona-chat: log in to chat and vote.",
                        max_file_size=settings.get("PERSONA_UI_MAX_UPLOAD_BYTES"))
