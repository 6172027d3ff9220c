"""Who is calling: the anonymous identity cookie, and the WebSocket origin check.

Every browser gets a random user id in a signed, HttpOnly, SameSite=Lax cookie on its first
page load, `/api/*` call or WebSocket upgrade. The signature (HMAC-SHA256 with
`TOKENWIRE_SECRET`) means a client cannot pick another user's id; nodes that share the
secret share identities.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Iterable
from typing import Final
from urllib.parse import urlsplit

from litestar.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

COOKIE_NAME: Final = "tw_id"
COOKIE_MAX_AGE: Final = 400 * 24 * 3600  # the longest lifetime browsers accept
_SIG_BYTES: Final = 16


class Identity:
    def __init__(self, secret: str | None) -> None:
        if secret is None:
            log.warning(
                "TOKENWIRE_SECRET is not set: using a random secret for this process. "
                "Identities will not survive a restart, and several processes must share "
                "one secret (set TOKENWIRE_SECRET to the same value on every node)."
            )
            secret = secrets.token_urlsafe(32)
        self._key = hashlib.sha256(b"tokenwire identity\0" + secret.encode()).digest()

    def issue(self) -> tuple[str, str]:
        """A new user id and its cookie value."""
        user = secrets.token_urlsafe(16)
        return user, f"{user}.{self._sign(user)}"

    def verify(self, cookie: str | None) -> str | None:
        """The user id in a cookie value, or None if it is absent or forged."""
        if not cookie or "." not in cookie:
            return None
        user, _, sig = cookie.rpartition(".")
        # Bytes, not str: compare_digest refuses non-ASCII str, and cookies are any latin-1.
        if not user or not hmac.compare_digest(sig.encode(), self._sign(user).encode()):
            return None
        return user

    def _sign(self, user: str) -> str:
        mac = hmac.new(self._key, user.encode(), hashlib.sha256).digest()[:_SIG_BYTES]
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def read_cookie(scope: Scope, name: str = COOKIE_NAME) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    for part in raw.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def origin_allowed(scope: Scope, allowed: Iterable[str]) -> bool:
    """Browsers always send `Origin` on a WebSocket upgrade: it must be this server's own
    origin or one listed in TOKENWIRE_ALLOWED_ORIGINS. Non-browser clients send none."""
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if origin in allowed:
        return True
    host = _header(scope, b"host")
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # e.g. "http://[::1": no origin a browser sends, so not ours
        return False
    return host is not None and netloc.lower() == host.lower()


def cookie_header(value: str, secure: bool) -> bytes:
    attrs = f"{COOKIE_NAME}={value}; Path=/; Max-Age={COOKIE_MAX_AGE}; HttpOnly; SameSite=Lax"
    return (attrs + ("; Secure" if secure else "")).encode()


class BearerTokens:
    """`Authorization: Bearer <token>` for scripts: each configured token is one user."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = tuple(t.encode() for t in tokens)

    def user(self, header: str) -> str | None:
        """The user of a `Bearer` header, or None if the token is not configured."""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = token.strip().encode()
        # Compare with every token, in constant time each, so timing tells nothing.
        found = [t for t in self._tokens if hmac.compare_digest(t, given)]
        if not found:
            return None
        digest = hashlib.sha256(b"tokenwire bearer\0" + found[0]).digest()[:16]
        return "b-" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def _refuse_unauthorized(scope: Scope, send: Send) -> None:
    if str(scope["type"]) == "websocket":
        # Before accept, uvicorn answers the upgrade with 403.
        await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
        return
    body = (
        b'{"type":"error","id":null,"code":"unauthorized",'
        b'"message":"unknown bearer token","retryable":false}'
    )
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def identity_middleware(
    identity: Identity, secure: bool, bearer: BearerTokens
) -> Callable[[ASGIApp], ASGIApp]:
    """ASGI middleware: puts the caller's user id in `scope["state"]["user"]`: from a bearer
    token when one is sent (an unknown one is refused: 401, or 403 for an upgrade), else
    from the cookie, issuing a new identity (and its Set-Cookie, on the HTTP response or
    the WebSocket accept) when there is none."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] not in ("http", "websocket"):
                await app(scope, receive, send)
                return
            authorization = _header(scope, b"authorization")
            if authorization is not None:
                bearer_user = bearer.user(authorization)
                if bearer_user is None:
                    await _refuse_unauthorized(scope, send)
                    return
                scope.setdefault("state", {})["user"] = bearer_user
                await app(scope, receive, send)
                return
            user = identity.verify(read_cookie(scope))
            new_cookie: bytes | None = None
            if user is None:
                user, value = identity.issue()
                new_cookie = cookie_header(value, secure or scope.get("scheme") in ("https", "wss"))
            scope.setdefault("state", {})["user"] = user

            async def send_with_cookie(message: Message) -> None:
                if new_cookie is not None and message["type"] in (
                    "http.response.start",
                    "websocket.accept",
                ):
                    headers = list(message.get("headers") or [])
                    headers.append((b"set-cookie", new_cookie))
                    message["headers"] = headers
                await send(message)

            await app(scope, receive, send_with_cookie if new_cookie else send)

        return wrapped

    return middleware


# Methods that never change state here: a page on another origin may send them (their
# responses stay unreadable to it, as no CORS header is sent).
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_ORIGIN_REFUSED: Final = (
    b'{"type":"error","id":null,"code":"unauthorized",'
    b'"message":"requests from this origin are not allowed; '
    b'list it in TOKENWIRE_ALLOWED_ORIGINS","retryable":false}'
)


def origin_middleware(allowed: Iterable[str]) -> Callable[[ASGIApp], ASGIApp]:
    """ASGI middleware: an HTTP request that may change state (any method but GET, HEAD,
    OPTIONS) sent by a browser from another origin is refused with 403, before anything
    reads it: the check `ws_endpoint` makes on upgrades. SameSite=Lax alone would let a
    sibling subdomain (same site, other origin) start and cancel chats with the cookie."""
    origins = tuple(allowed)

    def middleware(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if (
                str(scope["type"]) == "http"
                and scope.get("method") not in SAFE_METHODS
                and not origin_allowed(scope, origins)
            ):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(_ORIGIN_REFUSED)).encode()),
                        ],
                    }
                )
                await send(
                    {"type": "http.response.body", "body": _ORIGIN_REFUSED, "more_body": False}
                )
                return
            await app(scope, receive, send)

        return wrapped

    return middleware


# On every HTTP response. Deliberately no script policy: PyScript needs eval and WASM, so a
# Content-Security-Policy beyond `frame-ancestors` would be mostly exceptions.
SECURITY_HEADERS: Final = (
    (b"x-content-type-options", b"nosniff"),  # a JSON error is never run as a script or page
    (b"x-frame-options", b"DENY"),  # no other site may frame the chat page (clickjacking)
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"referrer-policy", b"same-origin"),
)


def security_headers_middleware(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: adds `SECURITY_HEADERS` to every HTTP response."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if str(scope["type"]) != "http":
            await app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*(message.get("headers") or []), *SECURITY_HEADERS]
            await send(message)

        await app(scope, receive, send_with_headers)

    return wrapped
