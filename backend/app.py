"""`create_app(settings)`: the parts wired together, the routes, the lifespan. Wiring only.

The `Runtime` holds every part of one server process. It is built here and opened by the
app's lifespan (which owns its resources); `backend.__main__` also reaches it to close
every WebSocket with 1001 before uvicorn's own shutdown would close them with 1012.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from litestar import Litestar, MediaType, Response, get
from litestar.config.compression import CompressionConfig
from litestar.datastructures import CacheControlHeader, State
from litestar.exceptions import HTTPException
from litestar.static_files import create_static_files_router

from backend.chat.service import ChatError, ChatService, Drained
from backend.delivery.hub import Hub
from backend.protocol import FrameError
from backend.providers import ClockProvider, DemoProvider, OpenAIProvider
from backend.providers.base import Provider
from backend.settings import Settings
from backend.storage.broker import Broker, MemoryBroker
from backend.storage.broker.redis import RedisBroker
from backend.storage.history import SqliteHistory
from backend.storage.history.base import History
from backend.storage.history.redis import RedisHistory
from backend.storage.leases import Leases, MemoryLeases, RedisLeases
from backend.storage.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter, TokenQuota
from backend.storage.request_ids import MemoryRequestRegistry, RequestRegistry
from backend.storage.request_ids.redis import RedisRequestRegistry
from backend.storage.streams import MemoryStreamLog, StreamLog
from backend.storage.streams.redis import RedisStreamLog
from backend.transports.http import (
    ApiError,
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
from backend.web.assets import NODE_MODULES, VendorFiles, pyscript_config_route, vendor_file
from backend.web.logs import request_id_middleware, user_context_middleware
from backend.web.metrics import Metrics, Sample, process_samples, render
from backend.web.security import (
    BearerTokens,
    Identity,
    identity_middleware,
    origin_middleware,
    security_headers_middleware,
)

log = logging.getLogger(__name__)

FRONTEND_DIR: Final = Path(__file__).resolve().parent.parent / "frontend"


@dataclass(eq=False)
class Runtime:
    settings: Settings
    hub: Hub = field(default_factory=Hub)
    metrics: Metrics = field(default_factory=Metrics)
    # Set while the app runs (see `lifespan`).
    broker: Broker = field(init=False)
    log: StreamLog = field(init=False)
    history: History = field(init=False)
    provider: Provider = field(init=False)
    chat: ChatService = field(init=False)
    limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.hub.on_failure = self.metrics.contained_failures.add

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        s = self.settings
        registry: RequestRegistry
        leases: Leases
        if s.redis_url:
            # Every part a single process keeps in memory moves to Redis (DESIGN.md).
            broker = RedisBroker(s.redis_url)
            await broker.open()
            self.broker = broker
            self.log = RedisStreamLog(s.redis_url, max_tokens=s.stream_max_tokens)
            self.history = RedisHistory(s.redis_url)
            registry = RedisRequestRegistry(s.redis_url)
            leases = RedisLeases(s.redis_url)
            self.limiter = RedisRateLimiter(s.redis_url)
        else:
            self.broker = MemoryBroker()
            self.log = MemoryStreamLog(max_tokens=s.stream_max_tokens)
            self.history = await SqliteHistory.open(s.db)
            registry = MemoryRequestRegistry()
            leases = MemoryLeases()
            self.limiter = MemoryRateLimiter()
        self.provider = make_provider(s)
        self.chat = ChatService(
            log=self.log,
            broker=self.broker,
            history=self.history,
            provider=self.provider,
            registry=registry,
            leases=leases,
            limiter=self.limiter,
            chat_rate=s.chat_rate,
            chat_burst=s.chat_burst,
            node=s.node,
            stream_ttl=s.stream_ttl,
            max_tokens=s.stream_max_tokens,
            context_messages=s.context_messages,
            lease_ttl=s.lease_seconds,
            metrics=self.metrics,
            quota=(
                TokenQuota(self.limiter, s.token_quota, s.token_quota_window)
                if s.token_quota > 0
                else None
            ),
        )
        await self.chat.open()
        if not NODE_MODULES.is_dir():
            log.warning(
                "frontend/node_modules is missing: the chat page cannot load PyScript. "
                "Run `make run`, or `npm ci --prefix frontend`."
            )
        log.info("tokenwire node %s ready (provider %s)", s.node, self.provider.name)
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        loop.set_exception_handler(self._on_loop_error)
        try:
            yield
        finally:
            loop.set_exception_handler(previous)
            await self.hub.aclose()  # its heartbeat and watch sweeps
            await self.chat.aclose()
            await self.provider.aclose()
            await self.history.aclose()
            await self.log.aclose()
            await leases.aclose()
            await self.limiter.aclose()
            if isinstance(registry, RedisRequestRegistry):
                await registry.aclose()
            await self.broker.aclose()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """What reached the event loop unhandled (a task's exception nobody retrieved, a
        callback that raised): counted, then logged as asyncio always does."""
        self.metrics.contained_failures.add("loop")
        loop.default_exception_handler(context)

    async def drain(self, grace: float) -> Drained:
        """Shutdown, the graceful part, once the server has stopped accepting connections:
        new chats are refused (`shutting_down`, retryable), every WebSocket client is told
        1001 (reconnect at once: with Redis, to another node, where it resumes) and every
        SSE response ends (its EventSource reconnects); then the running generations may
        finish into the log, published live to wherever their readers went, until `grace`
        seconds after the drain began. Those still running then are stopped: their answers
        so far are saved as incomplete and their readers get `shutting_down`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.chat.refuse_new_chats()
        told = len(self.hub.websockets) + len(self.hub.sse)
        log.info(
            "draining: %d clients told to go away, %d generations may finish within %g s",
            told,
            self.chat.active_streams,
            grace,
        )
        await self.hub.close_all(1001, "server going away", timeout=grace)
        drained = await self.chat.drain(timeout=max(0.0, deadline - loop.time()))
        log.info(
            "drained in %.1f s: generations: %d finished, %d stopped at the end of the grace "
            "period (saved as incomplete)",
            grace - max(0.0, deadline - loop.time()),
            drained.finished,
            drained.stopped,
        )
        return drained


def make_provider(s: Settings) -> Provider:
    if s.provider == "openai":
        return OpenAIProvider(
            base_url=s.openai_base_url,
            api_key=s.openai_api_key,
            model=s.openai_model,
            timeout=s.provider_timeout,
        )
    paced = ClockProvider if s.provider == "clock" else DemoProvider
    return paced(
        first_token_delay=s.demo_first_token_delay,
        tokens_per_second=s.demo_tokens_per_second,
        paragraphs=s.demo_paragraphs,
    )


@get("/metrics", media_type=MediaType.TEXT, sync_to_thread=False)
def metrics(state: State) -> Response[str]:
    """Prometheus text format: the process's counters, and gauges read now."""
    r: Runtime = state.runtime
    samples = [
        Sample(
            "tokenwire_connections", "gauge", "Open WebSocket connections", len(r.hub.websockets)
        ),
        Sample("tokenwire_sse_responses", "gauge", "Open SSE responses", len(r.hub.sse)),
        Sample("tokenwire_streams_active", "gauge", "Generations running", r.chat.active_streams),
        Sample("tokenwire_stream_logs", "gauge", "Stream logs held", len(r.log)),
        Sample("tokenwire_subscriptions", "gauge", "Broker listeners", r.broker.subscriptions()),
        Sample("tokenwire_broker_healthy", "gauge", "1 if fan-out works", int(r.broker.healthy)),
        Sample(
            "tokenwire_tasks", "gauge", "asyncio tasks alive (leak check)", len(asyncio.all_tasks())
        ),
        Sample(
            "tokenwire_generations_total",
            "counter",
            "Generations started",
            r.chat.generations_started,
        ),
        Sample(
            "tokenwire_producers_lost_total",
            "counter",
            "Streams ended for their readers because their node died",
            r.chat.producers_lost,
        ),
        *process_samples(),
    ]
    return Response(
        render(r.metrics, samples), media_type="text/plain; version=0.0.4; charset=utf-8"
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
            ApiError: handle_api_error,
            ChatError: handle_api_error,
            FrameError: handle_api_error,
            HTTPException: handle_http_exception,
            500: handle_http_exception,
        },
        logging_config=None,
    )
