"""A provider for any OpenAI-compatible `/chat/completions` endpoint, streamed over SSE.

`OpenAIProvider` only moves bytes: `SSEParser` (pure, no I/O) cuts the body into events and
msgspec decodes each event into a small chunk struct.

Deliberate choices:

- The body is split into lines here, on bytes, not with `httpx.Response.aiter_lines`: httpx
  splits like `str.splitlines`, which also breaks on U+2028, U+0085 and friends. JSON allows
  those raw inside strings, so a model that writes one would corrupt the chunk. SSE lines end
  only at CR, LF or CRLF, and those bytes never occur inside a UTF-8 sequence.
- Error messages carry the HTTP status and, at most, the upstream error's `message` field
  (truncated, with the API key masked if the upstream echoes it). Never the raw body, never the
  request, never `str()` of an httpx exception (it can contain the URL).
- A stream that ends without `[DONE]` is still a success when a `finish_reason` arrived:
  several compatible servers omit `[DONE]`. With neither, the answer is incomplete and that is
  a failure.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Sequence
from typing import Final

import httpx
import msgspec

from backend.protocol import ChatTurn, DoneReason
from backend.providers.base import Finish, Provider, ProviderError

DEFAULT_TIMEOUT: Final = 60.0
# Connecting, sending the request and waiting for a pooled connection are quick or broken;
# only the wait for the next byte (`read`) has to cover the model's thinking time.
CONNECT_TIMEOUT: Final = 10.0
WRITE_TIMEOUT: Final = 10.0
POOL_TIMEOUT: Final = 10.0
# One SSE event (one chunk of JSON) larger than this is a broken upstream, not a long answer.
MAX_EVENT_BYTES: Final = 1024 * 1024
# How much of a failed response's body is read to find its error message.
MAX_ERROR_BODY_BYTES: Final = 64 * 1024
# Upstream error messages are cut to this many characters before they reach a user.
MAX_UPSTREAM_MESSAGE: Final = 200

_DONE: Final = b"[DONE]"
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")
_UNPRINTABLE: Final = re.compile(r"[\x00-\x1f\x7f]+")


class SSEParser:
    """Server-Sent Events parsing, bytes in, event data out (no I/O).

    Follows the SSE spec for what matters here: lines end at CRLF, CR or LF; `:` starts a
    comment; `data` lines of one event are joined with LF; a blank line dispatches the event;
    other fields (`event`, `id`, `retry`) are ignored. An event without a blank line after it
    when the body ends is incomplete and is dropped, as the spec says.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max_event_bytes = max_event_bytes
        self._line = bytearray()
        self._data: list[bytes] = []
        self._data_bytes = 0
        # A CR ended the previous chunk: an LF starting the next chunk belongs to it.
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event completed by `chunk`, in order."""
        events: list[bytes] = []
        start = 0
        if self._skip_lf and chunk.startswith(b"\n"):
            start = 1
        self._skip_lf = False
        for match in _LINE_END.finditer(chunk, start):
            self._line += chunk[start : match.start()]
            self._end_line(events)
            start = match.end()
        self._skip_lf = chunk.endswith(b"\r")
        self._line += chunk[start:]
        if len(self._line) + self._data_bytes > self._max_event_bytes:
            raise ProviderError(f"provider sent an event larger than {self._max_event_bytes} bytes")
        return events

    def _end_line(self, events: list[bytes]) -> None:
        line = bytes(self._line)
        self._line.clear()
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data.clear()
                self._data_bytes = 0
            return
        if line.startswith(b":"):
            return
        field, _, value = line.partition(b":")
        if field != b"data":
            return
        if value.startswith(b" "):
            value = value[1:]
        self._data.append(value)
        self._data_bytes += len(value) + 1
        if self._data_bytes > self._max_event_bytes:
            raise ProviderError(f"provider sent an event larger than {self._max_event_bytes} bytes")


# ---- wire structs -----------------------------------------------------------------------
# Only the fields read here; compatible servers add many others, hence no unknown-field check.


class _Delta(msgspec.Struct, forbid_unknown_fields=False):
    content: str | None = None


class _Choice(msgspec.Struct, forbid_unknown_fields=False):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _UpstreamError(msgspec.Struct, forbid_unknown_fields=False):
    message: str | None = None


class _Chunk(msgspec.Struct, forbid_unknown_fields=False):
    choices: list[_Choice] | None = None
    # Some servers send a bare string instead of an object.
    error: _UpstreamError | str | None = None


class _ErrorBody(msgspec.Struct, forbid_unknown_fields=False):
    error: _UpstreamError | str | None = None
    # FastAPI-style servers put the reason here.
    detail: str | None = None


class _Request(msgspec.Struct):
    model: str
    messages: list[ChatTurn]
    stream: bool = True


_chunk_decoder: Final = msgspec.json.Decoder(_Chunk)
_error_decoder: Final = msgspec.json.Decoder(_ErrorBody)
_request_encoder: Final = msgspec.json.Encoder()


def _finish_reason(value: str) -> DoneReason:
    # "content_filter", "tool_calls" and unknown values all mean the model stopped on its own.
    return "length" if value == "length" else "stop"


class OpenAIProvider(Provider):
    """Streams a chat completion from `{base_url}/chat/completions` (OpenAI's wire format).

    The httpx client is owned, and closed by `aclose`, unless one is passed in.
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        model: str,
        timeout: float = DEFAULT_TIMEOUT,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                "the OpenAI base URL must start with http:// or https://, "
                f"e.g. https://api.openai.com/v1 (got {base_url!r})"
            )
        if not model:
            raise ValueError("the OpenAI model name must not be empty (e.g. gpt-4o-mini)")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds (got {timeout!r})")
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key or None
        self._model = model
        self._timeout = httpx.Timeout(
            connect=CONNECT_TIMEOUT, read=timeout, write=WRITE_TIMEOUT, pool=POOL_TIMEOUT
        )
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=self._timeout)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def stream(self, turns: Sequence[ChatTurn]) -> AsyncIterator[str | Finish]:
        async for batch in self.batches(turns):
            if isinstance(batch, Finish):
                yield batch
            else:
                for token in batch:
                    yield token

    async def batches(self, turns: Sequence[ChatTurn]) -> AsyncIterator[list[str] | Finish]:
        # One list per network read: the chunks that arrived together are one append.
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        body = _request_encoder.encode(_Request(model=self._model, messages=list(turns)))
        # Only httpx's own errors are translated; CancelledError and GeneratorExit (the
        # consumer stopped) pass through, and `async with` closes the response either way.
        try:
            async with self._client.stream(
                "POST", self._url, content=body, headers=headers, timeout=self._timeout
            ) as response:
                if not response.is_success:
                    raise ProviderError(await self._status_message(response))
                parser = SSEParser()
                reason: DoneReason | None = None
                async for data in response.aiter_bytes():
                    batch: list[str] = []
                    for event in parser.feed(data):
                        if event.strip() == _DONE:
                            if batch:
                                yield batch
                            yield Finish(reason or "stop")
                            return
                        try:
                            content, finish = self._parse_chunk(event)
                        except ProviderError:
                            if batch:
                                yield batch  # what came before the bad chunk is kept
                            raise
                        if content:
                            batch.append(content)
                        if finish is not None:
                            reason = finish
                    if batch:
                        yield batch
        # `from exc` keeps the cause in server logs; only `str()` of the ProviderError, which
        # is built from fixed text, reaches a user.
        except httpx.TimeoutException as exc:
            raise ProviderError("provider timed out") from exc
        except httpx.ConnectError as exc:
            raise ProviderError("could not connect to the provider") from exc
        except httpx.RemoteProtocolError as exc:
            # Typically the connection closed in the middle of the body.
            raise ProviderError("provider stream ended early (connection lost)") from exc
        except httpx.HTTPError as exc:
            raise ProviderError(f"provider request failed ({type(exc).__name__})") from exc
        if reason is None:
            raise ProviderError("provider stream ended early")
        yield Finish(reason)

    def _parse_chunk(self, event: bytes) -> tuple[str | None, DoneReason | None]:
        try:
            chunk = _chunk_decoder.decode(event)
        except msgspec.DecodeError as exc:  # ValidationError is a subclass
            raise ProviderError("provider sent a malformed stream chunk") from exc
        if chunk.error is not None:
            raise ProviderError(self._with_upstream("provider reported an error", chunk.error))
        if not chunk.choices:
            return None, None  # e.g. the usage-only chunk some servers send last
        choice = chunk.choices[0]
        content = choice.delta.content if choice.delta is not None else None
        reason = _finish_reason(choice.finish_reason) if choice.finish_reason else None
        return content, reason

    async def _status_message(self, response: httpx.Response) -> str:
        prefix = f"provider returned HTTP {response.status_code}"
        body = bytearray()
        async for data in response.aiter_bytes():
            body += data
            if len(body) >= MAX_ERROR_BODY_BYTES:
                break
        try:
            parsed = _error_decoder.decode(bytes(body))
        except msgspec.DecodeError:
            return prefix  # not JSON (an HTML error page, a truncated body): status only
        return self._with_upstream(prefix, parsed.error or parsed.detail)

    def _with_upstream(self, prefix: str, error: _UpstreamError | str | None) -> str:
        message = error.message if isinstance(error, _UpstreamError) else error
        if not message:
            return prefix
        if self._api_key is not None:
            message = message.replace(self._api_key, "***")
        message = _UNPRINTABLE.sub(" ", message).strip()
        if len(message) > MAX_UPSTREAM_MESSAGE:
            message = message[: MAX_UPSTREAM_MESSAGE - 3] + "..."
        return f"{prefix}: {message}" if message else prefix
