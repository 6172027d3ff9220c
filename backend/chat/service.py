"""Start, replay, resume and cancel chat streams; run and own the generation tasks.

Transports (WebSocket, SSE, HTTP) call this service and never touch providers or logs'
write side. A generation never waits for a client: it appends each token to the stream
log and publishes it to the user's channel; whoever is listening, or comes back later,
gets it from there. Disconnect is not cancel: a generation runs to its end (bounded by
`stream_max_tokens` and the provider's timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from redis.exceptions import RedisError

from backend.protocol import (
    CONFLICT,
    NOT_FOUND,
    OVERLOADED,
    PROVIDER_ERROR,
    RATE_LIMITED,
    SHUTTING_DOWN,
    STREAM_EXPIRED,
    ChatTurn,
    DoneFrame,
    DoneReason,
    ErrorFrame,
    MessageFrame,
    ProtocolError,
    StreamEnd,
    TokenFrame,
    error_frame,
)
from backend.providers.base import Finish, Provider, ProviderError
from backend.storage.broker import (
    Broker,
    CancelRequest,
    Event,
    StreamEnded,
    Subscription,
    UserMessage,
    node_channel,
    user_channel,
)
from backend.storage.history.base import History
from backend.storage.leases import Leases
from backend.storage.ratelimit import RateLimiter, TokenQuota, retry_after_rounded
from backend.storage.request_ids import Claim, RequestRegistry, fingerprint
from backend.storage.streams import StreamExpired, StreamLog, StreamSlice
from backend.web.metrics import Metrics

log = logging.getLogger(__name__)

PROVIDER_ERROR_MESSAGE: Final = "the model failed to answer; retry"
PRODUCER_LOST_MESSAGE: Final = "the server generating this answer stopped; retry"
# Failures of the shared storage (Redis, or the SQLite file's disk): retryable for clients.
STORAGE_ERRORS: Final = (RedisError, OSError, TimeoutError)
# Seconds between charges of the running answers' tokens to their users' quotas: one write
# per user with answers running, per node, this often.
QUOTA_CHARGE_INTERVAL: Final = 1.0


def _unavailable(id: str | None) -> ErrorFrame:
    return error_frame(OVERLOADED, "storage is unavailable for a moment; retry", id)


@dataclass(frozen=True)
class Drained:
    """What a drain did: generations that ended by themselves within the grace period,
    and those still running at its end, stopped."""

    finished: int
    stopped: int


@dataclass(frozen=True)
class Accepted:
    id: str
    conversation: str
    new: bool  # False: a repeat of an earlier request, to be replayed


@dataclass(eq=False)
class _Generation:
    user: str
    id: str
    conversation: str
    task: asyncio.Task[None] | None = None
    # Why it is being stopped: "cancel" (a user), "lease" (lost it), "shutdown". The task
    # is also cancelled, but the loop checks this too: on Python 3.11 a cancel arriving
    # as an awaited Redis command completes can be swallowed (asyncio.wait_for).
    stop: str | None = None
    seq: int = 0
    parts: list[str] = field(default_factory=list)
    charged: int = 0  # of its `seq` tokens, those counted against the user's quota
    # An append is under way: if it is cut short, the log may hold more than `seq`.
    appending: bool = False


def _stop(gen: _Generation, why: str) -> None:
    if gen.stop is None:
        gen.stop = why
    if gen.task is not None:
        gen.task.cancel()


def stream_key(user: str, id: str) -> str:
    return f"{user}:{id}"


class ChatService:
    def __init__(
        self,
        *,
        log: StreamLog,
        broker: Broker,
        history: History,
        provider: Provider,
        registry: RequestRegistry,
        leases: Leases,
        limiter: RateLimiter,
        chat_rate: float,
        chat_burst: float,
        node: str,
        stream_ttl: float,
        max_tokens: int,
        context_messages: int,
        lease_ttl: float,
        metrics: Metrics | None = None,
        quota: TokenQuota | None = None,
    ) -> None:
        self.log = log
        self.broker = broker
        self.history = history
        self.provider = provider
        self.registry = registry
        self.leases = leases
        self.limiter = limiter
        self.chat_rate = chat_rate
        self.chat_burst = chat_burst
        self.node = node
        self.stream_ttl = stream_ttl
        self.max_tokens = max_tokens
        self.context_messages = context_messages
        self.lease_ttl = lease_ttl
        self.metrics = metrics if metrics is not None else Metrics()
        self.quota = quota
        self._running: dict[str, _Generation] = {}
        # Every generation task until it has returned, its end recorded (`_running` forgets
        # a generation before its end is saved); drain and close wait for these.
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._renewer: asyncio.Task[None] | None = None
        self._charger: asyncio.Task[None] | None = None
        self._node_subscription: Subscription | None = None
        self.generations_started = 0
        self.producers_lost = 0
        self._accepting: set[asyncio.Task[Accepted]] = set()  # see `start`

    async def open(self) -> None:
        """Listen for cancels routed to this node; keep this node's leases alive."""
        self._node_subscription = await self.broker.subscribe(
            node_channel(self.node), self._on_node_event
        )
        self._renewer = asyncio.create_task(self._renew_leases(), name="lease renewal")
        if self.quota is not None:
            self._charger = asyncio.create_task(
                self._charge_running(self.quota), name="quota charges"
            )

    @property
    def active_streams(self) -> int:
        return len(self._running)

    # ---- requests ----------------------------------------------------------------------

    async def start(
        self, user: str, id: str, conversation: str, text: str, origin: str
    ) -> Accepted:
        """Accept a chat: a new id generates; a repeat is `Accepted(new=False)` to replay;
        the same id with other content raises `ProtocolError(conflict)`. The acceptance runs to
        its end even if the caller is cancelled (its client left meanwhile)."""
        if self._closing:
            raise ProtocolError(
                error_frame(SHUTTING_DOWN, "the server is shutting down; retry", id)
            )
        # A task of the service's own, shielded from the caller: cut between claiming the id
        # and starting the generation, the id would stay claimed with nothing generating it,
        # and the client's repeat of the same chat would replay a stream that never comes.
        task = asyncio.create_task(self._accept(user, id, conversation, text, origin))
        self._accepting.add(task)
        task.add_done_callback(self._accepted)
        return await asyncio.shield(task)

    def _accepted(self, task: asyncio.Task[Accepted]) -> None:
        self._accepting.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that left never reads it

    async def _accept(
        self, user: str, id: str, conversation: str, text: str, origin: str
    ) -> Accepted:
        try:
            return await self._start(user, id, conversation, text, origin)
        except STORAGE_ERRORS:
            log.warning("storage unavailable while starting %s", id, exc_info=True)
            raise ProtocolError(_unavailable(id)) from None

    async def _start(
        self, user: str, id: str, conversation: str, text: str, origin: str
    ) -> Accepted:
        # Only new chats count: a replay costs no generation. The checks come before the
        # claim, so a refused chat leaves no claim behind and its retry is new again. The
        # quota first: it takes nothing, so a chat it refuses costs no chat-rate token.
        key = stream_key(user, id)
        fresh = not await self.registry.known(user, id)
        if fresh:
            if self.quota is not None and (wait := await self.quota.wait(user)) > 0:
                raise self._rate_limited(id, "token quota used up", wait)
            wait = await self.limiter.take(f"chat:{user}", self.chat_rate, self.chat_burst)
            if wait > 0:
                raise self._rate_limited(id, "too many new chats", wait)
            # The log exists before the claim: a repeat that finds the claim (on any node,
            # while this acceptance goes on) replays the log instead of finding none and
            # answering `stream_expired`. Creating is idempotent for a running stream.
            await self.log.create(key)
        claim = await self.registry.claim(user, id, fingerprint(conversation, text))
        if claim is Claim.CONFLICT:
            raise ProtocolError(_conflict(id))
        if claim is Claim.SAME:
            return Accepted(id, conversation, new=False)
        if not fresh:
            await self.log.create(key)  # the claim expired between `known` and `claim`
        if not await self.history.add_user_message(user, conversation, id, text):
            # Seen before this process's claims (e.g. before a restart): never generate twice.
            stored = await self.history.get_user_message(user, id)
            await self.log.finish(key, _expired(id), self.stream_ttl)
            if stored is None or stored.conversation != conversation or stored.text != text:
                raise ProtocolError(_conflict(id))
            return Accepted(id, conversation, new=False)
        await self.leases.acquire(key, self.node, self.lease_ttl)
        gen = _Generation(user=user, id=id, conversation=conversation)
        self._running[key] = gen
        self.generations_started += 1
        gen.task = asyncio.create_task(self._generate(gen, text), name=f"generate {id}")
        self._tasks.add(gen.task)
        gen.task.add_done_callback(self._tasks.discard)
        await self.broker.publish(
            user_channel(user),
            UserMessage(
                origin=origin, frame=MessageFrame(id=id, conversation=conversation, text=text)
            ),
        )
        return Accepted(id, conversation, new=True)

    def _rate_limited(self, id: str, why: str, wait: float) -> ProtocolError:
        self.metrics.rate_limited += 1
        return ProtocolError(
            error_frame(
                RATE_LIMITED,
                f"{why}; retry after `retry_after` seconds",
                id,
                retry_after=retry_after_rounded(wait),
            )
        )

    async def read_after(self, user: str, id: str, after: int, limit: int) -> StreamSlice:
        """Tokens of the user's stream `id` after `after`; `ProtocolError` with `not_found` for
        an id this user never used, `stream_expired` for one whose log is gone."""
        try:
            try:
                return await self.log.read_after(stream_key(user, id), after, limit)
            except StreamExpired:
                if after > 0:
                    # The client was shown tokens of it, so it existed for this user (ids
                    # are per user: this reveals nothing of anyone else's); its log and
                    # records are gone, e.g. with a Redis that restarted empty.
                    raise ProtocolError(_expired(id)) from None
                raise ProtocolError(await self._missing(user, id)) from None
        except STORAGE_ERRORS:
            raise ProtocolError(_unavailable(id)) from None

    async def cancel(self, user: str, id: str) -> None:
        """Stop the generation of the user's stream `id`, on whichever node runs it; it ends
        with `done` `cancelled`. A stream that already ended is left as it is."""
        key = stream_key(user, id)
        if self._cancel_local(key):
            return
        try:
            holder = await self.leases.holder(key)
            if holder is not None:
                await self.broker.publish(node_channel(holder), CancelRequest(user=user, id=id))
                return
            if await self.registry.known(user, id) or await self.history.get_user_message(user, id):
                return
        except STORAGE_ERRORS:
            raise ProtocolError(_unavailable(id)) from None
        raise ProtocolError(error_frame(NOT_FOUND, "no such stream", id))

    def _cancel_local(self, key: str) -> bool:
        gen = self._running.get(key)
        if gen is None:
            return False
        _stop(gen, "cancel")
        return True

    def _on_node_event(self, event: Event) -> None:
        if isinstance(event, CancelRequest):
            self._cancel_local(stream_key(event.user, event.id))

    async def check_producer(self, user: str, id: str) -> None:
        """A reader saw no progress on stream `id` for a while: if no node holds its lease
        and it has no end, its producer died. End it, so every reader gets a retryable
        error instead of waiting forever. Storage errors leave it for the next check."""
        key = stream_key(user, id)
        if key in self._running:
            return
        try:
            if await self.leases.holder(key) is not None:
                return
            piece = await self.log.read_after(key, 0, 0)
            if piece.end is not None:
                return
            end = error_frame(PROVIDER_ERROR, PRODUCER_LOST_MESSAGE, id)
            await self.log.finish(key, end, self.stream_ttl)
            await self.broker.publish(
                user_channel(user), StreamEnded(id=id, seq=piece.last_seq, frame=end)
            )
            self.producers_lost += 1
            log.warning("stream %s lost its producer; ended it for its readers", id)
        except (StreamExpired, *STORAGE_ERRORS):
            return

    def refuse_new_chats(self) -> None:
        """From now on, a new chat is answered `shutting_down` (retryable: elsewhere)."""
        self._closing = True

    async def drain(self, timeout: float) -> Drained:
        """Shutdown, the graceful part: refuse new chats (`shutting_down`, retryable) and
        let the running generations finish into the log for up to `timeout` seconds; those
        still running then are stopped as by `aclose`. Leases, cancels from other nodes and
        publishing all keep working meanwhile: readers on other nodes see no difference."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        started = self.generations_started - len(self._running)
        while (self._tasks or self._accepting) and (remaining := deadline - loop.time()) > 0:
            # A chat being accepted when `_closing` was set may start a generation
            # meanwhile: it too may finish, so wait for acceptances and generations alike.
            pending: set[asyncio.Task[Any]] = {*self._tasks, *self._accepting}
            await asyncio.wait(pending, timeout=remaining)
        stopped = await self._stop_all()
        return Drained(finished=self.generations_started - started - stopped, stopped=stopped)

    async def aclose(self) -> None:
        """Stop every generation (the answers so far are saved as incomplete) and wait."""
        self._closing = True
        await self._stop_all()
        for task in (self._renewer, self._charger):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._node_subscription is not None:
            await self._node_subscription.close()

    async def _stop_all(self) -> int:
        """Stop every running generation and wait until each has recorded its end; how many
        were stopped."""
        # Acceptances under way may still start generations: let them first (no new ones
        # begin once `_closing` is set; each is bounded by its storage calls' timeouts).
        await asyncio.gather(*self._accepting, return_exceptions=True)
        running = list(self._running.values())
        for gen in running:
            _stop(gen, "shutdown")
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return len(running)

    async def _renew_leases(self) -> None:
        """Renew every running generation's lease three times per lease period. A lease
        that went to nobody (this node stalled past it) stops its generation: another node
        may already have ended the stream for its readers."""
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            running = list(self._running.items())
            # All at once (on Redis, in one pipelined write): one round trip after another,
            # a node with hundreds of generations under load took longer than a lease to get
            # round them, and leases lapsed mid-stream.
            renewed = await asyncio.gather(
                *(self.leases.renew(key, self.node, self.lease_ttl) for key, _ in running),
                return_exceptions=True,
            )
            for (key, gen), held in zip(running, renewed, strict=True):
                if isinstance(held, BaseException):
                    if isinstance(held, STORAGE_ERRORS):
                        continue  # the storage is down: so is every other node's view of it
                    raise held
                # A generation that ended meanwhile released its lease: nothing was lost.
                if not held and gen.stop is None and self._running.get(key) is gen:
                    log.warning("generation %s lost its lease; stopping it", gen.id)
                    _stop(gen, "lease")

    # ---- generation --------------------------------------------------------------------

    async def _generate(self, gen: _Generation, text: str) -> None:
        key = stream_key(gen.user, gen.id)
        reason: DoneReason = "stop"
        end: StreamEnd | None = None
        shutting_down = False
        started = time.monotonic()
        try:
            turns = await self._context(gen.user, gen.conversation, gen.id, text)
            # Tokens the provider hands over together (a network read, a paced model's
            # overdue tokens) are one append and one event: under load a generation falls
            # behind its provider, and its cost then stays per batch, not per token.
            async for batch in self.provider.batches(turns):
                if isinstance(batch, Finish):
                    reason = batch.reason
                    break
                room = self.max_tokens - gen.seq
                if len(batch) > room:
                    if room > 0:
                        await self._emit(gen, key, batch[:room], started)
                    reason = "length"
                    break
                await self._emit(gen, key, batch, started)
                if gen.stop is not None:
                    raise asyncio.CancelledError
            end = DoneFrame(id=gen.id, seq=gen.seq, reason=reason)
        except asyncio.CancelledError:
            await self._settle(gen, key)
            if gen.stop == "cancel":
                end = DoneFrame(id=gen.id, seq=gen.seq, reason="cancelled")
            elif gen.stop == "lease":
                end = error_frame(PROVIDER_ERROR, PRODUCER_LOST_MESSAGE, gen.id)
            else:
                shutting_down = True
                end = error_frame(SHUTTING_DOWN, "the server restarted; retry", gen.id)
        except ProviderError as exc:
            end = error_frame(PROVIDER_ERROR, str(exc), gen.id)
        except Exception:
            log.exception("generation %s failed", gen.id)
            await self._settle(gen, key)
            end = error_frame(PROVIDER_ERROR, PROVIDER_ERROR_MESSAGE, gen.id)
        finally:
            self._running.pop(key, None)
            if end is None:  # BaseException other than cancellation: still end the stream
                end = error_frame(PROVIDER_ERROR, PROVIDER_ERROR_MESSAGE, gen.id)
            if isinstance(end, ErrorFrame) and end.code == PROVIDER_ERROR:
                self.metrics.provider_errors += 1
            await self._end(gen, end)
        if shutting_down:
            raise asyncio.CancelledError

    async def _emit(self, gen: _Generation, key: str, tokens: list[str], started: float) -> None:
        """Append `tokens` to the log and announce them as one event (`n` tokens)."""
        if gen.seq == 0:
            self.metrics.first_token_seconds.observe(time.monotonic() - started)
        data = tokens[0] if len(tokens) == 1 else "".join(tokens)
        n = len(tokens)
        gen.appending = True
        gen.seq = await self.log.append_and_publish(
            key,
            tokens,
            self.broker,
            user_channel(gen.user),
            lambda seq: TokenFrame(id=gen.id, seq=seq, data=data, n=n),
        )
        gen.appending = False
        gen.parts += tokens
        self.metrics.tokens_generated += n

    async def _settle(self, gen: _Generation, key: str) -> None:
        """An append cut short (the task cancelled, or its reply lost) may still have
        landed, and its event gone out: the log is the truth, so the generation takes what
        the log holds beyond `seq`. Its end then names the last token readers saw."""
        if not gen.appending:
            return
        gen.appending = False
        try:
            piece = await self.log.read_after(key, gen.seq)
        except Exception:
            log.warning("could not read back the last append of %s", gen.id, exc_info=True)
            return
        gen.seq += len(piece.tokens)
        gen.parts += piece.tokens
        self.metrics.tokens_generated += len(piece.tokens)

    async def _end(self, gen: _Generation, end: StreamEnd) -> None:
        key = stream_key(gen.user, gen.id)
        complete = isinstance(end, DoneFrame) and end.reason != "cancelled"
        # History first: a client that sees the end and then reads history finds the answer.
        # The quota is charged before the end is published, so a next chat sent on seeing
        # it finds the charge. Each step is tried even if one before failed (storage down):
        # what can be kept is.
        # Made one at a time: a step never reached (the task cut at exit) leaves no
        # never-awaited coroutine behind.
        steps: tuple[Callable[[], Awaitable[object]], ...] = (
            lambda: self.history.save_assistant_message(
                gen.user, gen.conversation, gen.id, "".join(gen.parts), complete
            ),
            lambda: self._charge(gen),
            lambda: self.log.finish(key, end, self.stream_ttl),
            lambda: self.broker.publish(
                user_channel(gen.user), StreamEnded(id=gen.id, seq=gen.seq, frame=end)
            ),
            lambda: self.leases.release(key, self.node),
        )
        for step in steps:
            try:
                await step()
            except Exception:
                log.warning("could not record the end of %s", gen.id, exc_info=True)

    async def _charge(self, gen: _Generation) -> None:
        """Charge the user's quota with what `gen` generated since its last charge."""
        # `seq` is the number of tokens in the log: what was generated, however it ended.
        # `charged` moves before the await, so a periodic charge and the final one never
        # count the same tokens twice.
        due, gen.charged = gen.seq - gen.charged, gen.seq
        if self.quota is not None:
            await self.quota.charge(gen.user, due)

    async def _charge_running(self, quota: TokenQuota) -> None:
        """Charge the running answers' tokens every QUOTA_CHARGE_INTERVAL, one write per
        user: a long answer counts while it runs, so a user cannot start answer after
        answer on a quota that only their ends would have used up."""
        while True:
            await asyncio.sleep(QUOTA_CHARGE_INTERVAL)
            due: dict[str, int] = {}
            for gen in self._running.values():
                due[gen.user] = due.get(gen.user, 0) + gen.seq - gen.charged
                gen.charged = gen.seq
            for user, tokens in due.items():
                try:
                    await quota.charge(user, tokens)
                except Exception:
                    # Storage down: these tokens go uncounted (fail open, as the limits do).
                    log.warning("could not charge the token quota of a user", exc_info=True)

    async def _context(self, user: str, conversation: str, id: str, text: str) -> list[ChatTurn]:
        turns: list[ChatTurn] = []
        if self.context_messages > 0:
            earlier = await self.history.messages(
                user, conversation, limit=self.context_messages + 1
            )
            for m in earlier or ():
                if m.id != id and m.text:
                    turns.append(ChatTurn(role=m.role, content=m.text))
            turns = turns[-self.context_messages :]
        turns.append(ChatTurn(role="user", content=text))
        return turns

    async def _missing(self, user: str, id: str) -> ErrorFrame:
        if await self.registry.known(user, id) or await self.history.get_user_message(user, id):
            return _expired(id)
        return error_frame(NOT_FOUND, "no such stream", id)


def _conflict(id: str) -> ErrorFrame:
    return error_frame(
        CONFLICT, "this request id was already used for another message; use a new id", id
    )


def _expired(id: str) -> ErrorFrame:
    return error_frame(
        STREAM_EXPIRED, "this answer is no longer available; send the message again", id
    )
