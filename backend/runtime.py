"""`Runtime`: every part of one server process, built from `Settings`, opened and closed by
the app's lifespan (which owns its resources). The transports reach it as
`state.runtime`; `backend.__main__` reaches it to drain (close every WebSocket with 1001
before uvicorn's own shutdown would close them with 1012). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from backend.chat.service import ChatService, Drained
from backend.delivery.hub import Hub
from backend.providers import ClockProvider, DemoProvider, OpenAIProvider
from backend.providers.base import Provider
from backend.settings import Settings
from backend.storage import Storage, open_storage
from backend.storage.broker import Broker
from backend.storage.history.base import History
from backend.storage.ratelimit import RateLimiter, TokenQuota
from backend.storage.streams import StreamLog
from backend.web.assets import NODE_MODULES
from backend.web.metrics import Metrics, Sample, process_samples

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Runtime:
    settings: Settings
    hub: Hub = field(default_factory=Hub)
    metrics: Metrics = field(default_factory=Metrics)
    # Set while the app runs (see `lifespan`).
    storage: Storage = field(init=False)
    provider: Provider = field(init=False)
    chat: ChatService = field(init=False)

    @property
    def broker(self) -> Broker:
        return self.storage.broker

    @property
    def log(self) -> StreamLog:
        return self.storage.log

    @property
    def history(self) -> History:
        return self.storage.history

    @property
    def limiter(self) -> RateLimiter:
        return self.storage.limiter

    def __post_init__(self) -> None:
        self.hub.on_failure = self.metrics.contained_failures.add

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        s = self.settings
        self.storage = await open_storage(s)
        self.provider = make_provider(s)
        self.chat = ChatService(
            log=self.log,
            broker=self.broker,
            history=self.history,
            provider=self.provider,
            registry=self.storage.request_ids,
            leases=self.storage.leases,
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
            await self.storage.aclose()

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

    def gauges(self) -> list[Sample]:
        """What `/metrics` reads now, beside the counters of `self.metrics`."""
        r = self
        return [
            Sample(
                "tokenwire_connections",
                "gauge",
                "Open WebSocket connections",
                len(r.hub.websockets),
            ),
            Sample("tokenwire_sse_responses", "gauge", "Open SSE responses", len(r.hub.sse)),
            Sample(
                "tokenwire_streams_active", "gauge", "Generations running", r.chat.active_streams
            ),
            Sample("tokenwire_stream_logs", "gauge", "Stream logs held", len(r.log)),
            Sample(
                "tokenwire_subscriptions", "gauge", "Broker listeners", r.broker.subscriptions()
            ),
            Sample(
                "tokenwire_broker_healthy", "gauge", "1 if fan-out works", int(r.broker.healthy)
            ),
            Sample(
                "tokenwire_tasks",
                "gauge",
                "asyncio tasks alive (leak check)",
                len(asyncio.all_tasks()),
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
