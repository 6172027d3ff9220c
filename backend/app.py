"""`create_app(settings)`: the parts wired together, the routes, the lifespan. Wiring only.

The `Runtime` holds every part of one server process. It is built here and opened by the
app's lifespan (which owns its resources); `backend.__main__` also reaches it to close
every WebSocket with 1001 before uvicorn's own shutdown would close them with 1012.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from litestar import Litestar, MediaType, Response, get
from litestar.config.compression import CompressionConfig
from litestar.datastructures import CacheControlHeader, State
from litestar.exceptions import HTTPException
from litestar.static_files import create_static_files_router

from backend.protocol import ProtocolError
from backend.runtime import Runtime
from backend.settings import Settings
from backend.transports.http import (
    cancel_stream,
    get_conversation,
    handle_api_error,
    handle_http_exception,
    healthz,
    list_conversations,
    path_guard_middleware,
    post_chat,
    readyz,
)
from backend.transports.sse import stream_events
from backend.transports.websocket import ws_endpoint
from backend.web.assets import VendorFiles, pyscript_config_route, vendor_file
from backend.web.logs import request_id_middleware, user_context_middleware
from backend.web.metrics import render
from backend.web.security import (
    BearerTokens,
    Identity,
    identity_middleware,
    origin_middleware,
    security_headers_middleware,
)

log = logging.getLogger(__name__)

FRONTEND_DIR: Final = Path(__file__).resolve().parent.parent / "frontend"


@get("/metrics", media_type=MediaType.TEXT, sync_to_thread=False)
def metrics(state: State) -> Response[str]:
    """Prometheus text format: the process's counters, and gauges read now."""
    r: Runtime = state.runtime
    return Response(
        render(r.metrics, r.gauges()), media_type="text/plain; version=0.0.4; charset=utf-8"
    )


def create_app(settings: Settings) -> Litestar:
    runtime = Runtime(settings)
    identity = Identity(settings.secret)
    return Litestar(
        route_handlers=[
            healthz,
            readyz,
            metrics,
            post_chat,
            cancel_stream,
            list_conversations,
            get_conversation,
            stream_events,
            ws_endpoint,
            vendor_file,
            pyscript_config_route,
            create_static_files_router(
                path="/",
                directories=[FRONTEND_DIR],
                html_mode=True,
                name="frontend",
                # The app's own files change with each deploy: revalidate every time.
                cache_control=CacheControlHeader(no_cache=True),
            ),
        ],
        compression_config=CompressionConfig(
            backend="gzip",
            minimum_size=1024,
            gzip_compress_level=6,
            # Vendor files come gzipped already; SSE must not be buffered by a compressor.
            exclude=["/vendor", "/api/streams"],
        ),
        middleware=[
            # Outermost first: every response, refusals included, carries its request id.
            request_id_middleware,
            security_headers_middleware,
            path_guard_middleware,
            origin_middleware(settings.allowed_origins),
            identity_middleware(
                identity, settings.cookie_secure, BearerTokens(settings.api_tokens)
            ),
            user_context_middleware,
        ],
        lifespan=[lambda app: runtime.lifespan()],
        state=State({"runtime": runtime, "vendor_files": VendorFiles()}),
        exception_handlers={
            ProtocolError: handle_api_error,
            HTTPException: handle_http_exception,
            500: handle_http_exception,
        },
        logging_config=None,
    )
