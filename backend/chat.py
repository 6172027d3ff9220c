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
from dataclasses import dataclass, field
from typing import Final

from backend.broker import Broker, StreamEnded, UserMessage, user_channel
from backend.history.base import History
from backend.idempotency import Claim, RequestRegistry, fingerprint
from backend.protocol import (
    CONFLICT,
    NOT_FOUND,
    PROVIDER_ERROR,
    SHUTTING_DOWN,
    STREAM_EXPIRED,
    ChatTurn,
    DoneFrame,
    DoneReason,
    ErrorFrame,
    MessageFrame,
    StreamEnd,
    TokenFrame,
    error_frame,
)
from backend.providers.base import Finish, Provider, ProviderError
from backend.streams import StreamExpired, StreamLog, StreamSlice

log = logging.getLogger(__name__)

# How long an unexplained provider failure may take to be reported, at most.
PROVIDER_ERROR_MESSAGE: Final = "the model failed to answer; retry"


class ChatError(Exception):
    """A request that cannot be served; `frame` is the error for the client."""

    def __init__(self, frame: ErrorFrame) -> None:
        super().__init__(frame.message)
        self.frame = frame


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
    cancel_requested: bool = False
    seq: int = 0
    parts: list[str] = field(default_factory=list)


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
        stream_ttl: float,
        max_tokens: int,
        context_messages: int,
    ) -> None:
        self.log = log
        self.broker = broker
        self.history = history
        self.provider = provider
        self.registry = registry
        self.stream_ttl = stream_ttl
        self.max_tokens = max_tokens
        self.context_messages = context_messages
        self._running: dict[str, _Generation] = {}
        self._closing = False
        self.generations_started = 0

    @property
    def active_streams(self) -> int:
        return len(self._running)

    # ---- requests ----------------------------------------------------------------------

    async def start(
        self, user: str, id: str, conversation: str, text: str, origin: str
    ) -> Accepted:
        """Accept a chat: a new id generates; a repeat is `Accepted(new=False)` to replay;
        the same id with other content raises `ChatError(conflict)`."""
        if self._closing:
            raise ChatError(error_frame(SHUTTING_DOWN, "the server is shutting down; retry", id))
        claim = await self.registry.claim(user, id, fingerprint(conversation, text))
        if claim is Claim.CONFLICT:
            raise ChatError(_conflict(id))
        if claim is Claim.SAME:
            return Accepted(id, conversation, new=False)
        key = stream_key(user, id)
        # The log exists before anything else awaits, so a concurrent repeat can replay it.
        await self.log.create(key)
        if not await self.history.add_user_message(user, conversation, id, text):
            # Seen before this process's claims (e.g. before a restart): never generate twice.
            stored = await self.history.get_user_message(user, id)
            await self.log.finish(key, _expired(id), self.stream_ttl)
            if stored is None or stored.conversation != conversation or stored.text != text:
                raise ChatError(_conflict(id))
            return Accepted(id, conversation, new=False)
        gen = _Generation(user=user, id=id, conversation=conversation)
        self._running[key] = gen
        self.generations_started += 1
        gen.task = asyncio.create_task(self._generate(gen, text), name=f"generate {id}")
        await self.broker.publish(
            user_channel(user),
            UserMessage(
                origin=origin, frame=MessageFrame(id=id, conversation=conversation, text=text)
            ),
        )
        return Accepted(id, conversation, new=True)

    async def read_after(self, user: str, id: str, after: int, limit: int) -> StreamSlice:
        """Tokens of the user's stream `id` after `after`; `ChatError` with `not_found` for
        an id this user never used, `stream_expired` for one whose log is gone."""
        try:
            return await self.log.read_after(stream_key(user, id), after, limit)
        except StreamExpired:
            raise ChatError(await self._missing(user, id)) from None

    async def cancel(self, user: str, id: str) -> None:
        """Stop the generation of the user's stream `id`; it ends with `done` `cancelled`.
        A stream that already ended is left as it is."""
        gen = self._running.get(stream_key(user, id))
        if gen is None:
            if await self.registry.known(user, id) or await self.history.get_user_message(user, id):
                return
            raise ChatError(error_frame(NOT_FOUND, "no such stream", id))
        if gen.task is not None and not gen.cancel_requested:
            gen.cancel_requested = True
            gen.task.cancel()

    async def aclose(self) -> None:
        """Stop every generation (the answers so far are saved as incomplete) and wait."""
        self._closing = True
        tasks = [g.task for g in self._running.values() if g.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- generation --------------------------------------------------------------------

    async def _generate(self, gen: _Generation, text: str) -> None:
        key = stream_key(gen.user, gen.id)
        reason: DoneReason = "stop"
        end: StreamEnd | None = None
        shutting_down = False
        try:
            turns = await self._context(gen.user, gen.conversation, gen.id, text)
            async for item in self.provider.stream(turns):
                if isinstance(item, Finish):
                    reason = item.reason
                    break
                if gen.seq >= self.max_tokens:
                    reason = "length"
                    break
                gen.seq = await self.log.append(key, (item,))
                gen.parts.append(item)
                await self.broker.publish(
                    user_channel(gen.user), TokenFrame(id=gen.id, seq=gen.seq, data=item)
                )
            end = DoneFrame(id=gen.id, seq=gen.seq, reason=reason)
        except asyncio.CancelledError:
            if gen.cancel_requested:
                end = DoneFrame(id=gen.id, seq=gen.seq, reason="cancelled")
            else:
                shutting_down = True
                end = error_frame(SHUTTING_DOWN, "the server restarted; retry", gen.id)
        except ProviderError as exc:
            end = error_frame(PROVIDER_ERROR, str(exc), gen.id)
        except Exception:
            log.exception("generation %s failed", gen.id)
            end = error_frame(PROVIDER_ERROR, PROVIDER_ERROR_MESSAGE, gen.id)
        finally:
            self._running.pop(key, None)
            if end is None:  # BaseException other than cancellation: still end the stream
                end = error_frame(PROVIDER_ERROR, PROVIDER_ERROR_MESSAGE, gen.id)
            await self._end(gen, end)
        if shutting_down:
            raise asyncio.CancelledError

    async def _end(self, gen: _Generation, end: StreamEnd) -> None:
        key = stream_key(gen.user, gen.id)
        complete = isinstance(end, DoneFrame) and end.reason != "cancelled"
        # History first: a client that sees the end and then reads history finds the answer.
        try:
            await self.history.save_assistant_message(
                gen.user, gen.conversation, gen.id, "".join(gen.parts), complete
            )
        finally:
            await self.log.finish(key, end, self.stream_ttl)
            await self.broker.publish(
                user_channel(gen.user), StreamEnded(id=gen.id, seq=gen.seq, frame=end)
            )

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
