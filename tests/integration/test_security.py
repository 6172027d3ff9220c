"""The security review's claims (README.md, "Security review"), each checked: the identity
cookie, the origin checks, no exception text and no secret in any response or log line,
no HTML built from user or model text, and the size limit of WebSocket messages."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import get
from litestar.testing import TestClient
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from backend.app import create_app
from backend.settings import Settings
from backend.web.security import (
    COOKIE_MAX_AGE,
    COOKIE_NAME,
    Identity,
    cookie_header,
    origin_allowed,
    read_cookie,
)
from frontend.tokenwire.core.markdown import TAGS, MarkdownStream
from harness.server import ROOT, TIMEOUT, Client, Server, new_id, start_chat
from tests.support.fake_openai import API_KEY, FakeOpenAI

SECRET = "s" * 32
OTHER_SECRET = "o" * 32


def scope(**headers: str) -> Any:
    """A minimal ASGI scope with these headers (`x_y` becomes `x-y`)."""
    return {
        "type": "websocket",
        "headers": [
            (k.replace("_", "-").encode(), v.encode("latin-1")) for k, v in headers.items()
        ],
    }


# ---- identity --------------------------------------------------------------------------------


def test_issue_then_verify() -> None:
    identity = Identity(SECRET)
    user, cookie = identity.issue()
    assert user
    assert cookie.startswith(f"{user}.")
    assert identity.verify(cookie) == user


def test_every_issue_is_a_new_user() -> None:
    identity = Identity(SECRET)
    users = {identity.issue()[0] for _ in range(50)}
    assert len(users) == 50


def test_nodes_sharing_the_secret_share_identities() -> None:
    node_a, node_b = Identity(SECRET), Identity(SECRET)
    user_a, cookie_a = node_a.issue()
    user_b, cookie_b = node_b.issue()
    assert node_b.verify(cookie_a) == user_a
    assert node_a.verify(cookie_b) == user_b


def test_without_a_secret_identities_hold_within_the_process_only() -> None:
    identity = Identity(None)
    user, cookie = identity.issue()
    assert identity.verify(cookie) == user
    assert Identity(None).verify(cookie) is None


def forged_signature(cookie: str, other: str) -> str:
    user, _, sig = cookie.rpartition(".")
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    return f"{user}.{flipped}"


def other_user(cookie: str, other: str) -> str:
    _, _, sig = cookie.rpartition(".")
    return f"someone-else.{sig}"


REJECTED: list[Any] = [
    pytest.param(forged_signature, id="forged-signature"),
    pytest.param(other_user, id="signature-of-another-user"),
    pytest.param(lambda cookie, other: other, id="other-secret"),
    pytest.param(lambda cookie, other: cookie + "x", id="signature-extended"),
    pytest.param(lambda cookie, other: cookie[:-1], id="signature-truncated"),
    pytest.param(lambda cookie, other: cookie.rpartition(".")[0], id="no-signature"),
    pytest.param(lambda cookie, other: cookie.rpartition(".")[0] + ".", id="empty-signature"),
    pytest.param(lambda cookie, other: "." + cookie.rpartition(".")[2], id="empty-user"),
    pytest.param(lambda cookie, other: "garbage", id="garbage"),
    pytest.param(lambda cookie, other: "a.b.c", id="dotted-garbage"),
    pytest.param(lambda cookie, other: ".", id="dot"),
    pytest.param(lambda cookie, other: "", id="empty"),
    pytest.param(lambda cookie, other: None, id="none"),
    # Cookie headers are read as latin-1: any byte a client sends may appear here.
    pytest.param(lambda cookie, other: "user.\u00e9t\u00e9", id="non-ascii-signature"),
    pytest.param(lambda cookie, other: cookie + "\u00ff", id="non-ascii-after-signature"),
]


@pytest.mark.parametrize("make", REJECTED)
def test_verify_rejects(make: Callable[[str, str], str | None]) -> None:
    identity = Identity(SECRET)
    _, cookie = identity.issue()
    _, other = Identity(OTHER_SECRET).issue()
    assert identity.verify(make(cookie, other)) is None


# ---- origin ----------------------------------------------------------------------------------

ALLOWED = ("https://chat.example.com", "http://localhost:5173")

ORIGINS = [
    pytest.param(scope(host="example.com:8000"), True, id="no-origin"),
    pytest.param(scope(), True, id="no-origin-no-host"),
    pytest.param(
        scope(host="example.com:8000", origin="http://example.com:8000"), True, id="same-host-port"
    ),
    pytest.param(scope(host="example.com", origin="https://example.com"), True, id="same-host"),
    pytest.param(
        scope(host="Example.COM:8000", origin="http://example.com:8000"),
        True,
        id="same-host-any-case",
    ),
    pytest.param(
        scope(host="example.com:8000", origin="http://example.com:8000/"),
        True,
        id="same-host-trailing-slash",
    ),
    pytest.param(scope(host="example.com", origin="https://evil.com"), False, id="other-host"),
    pytest.param(
        scope(host="example.com:8000", origin="http://example.com:9000"), False, id="other-port"
    ),
    pytest.param(
        scope(host="example.com:8000", origin="http://example.com"), False, id="origin-no-port"
    ),
    pytest.param(
        scope(host="example.com", origin="http://example.com:8000"), False, id="host-no-port"
    ),
    pytest.param(
        scope(host="example.com", origin="https://example.com.evil.com"), False, id="host-prefix"
    ),
    pytest.param(
        scope(host="example.com", origin="https://evilexample.com"), False, id="host-suffix"
    ),
    pytest.param(
        scope(host="example.com", origin="https://example.com@evil.com"), False, id="userinfo"
    ),
    pytest.param(scope(host="example.com", origin="null"), False, id="null-origin"),
    pytest.param(scope(host="example.com", origin="example.com"), False, id="origin-no-scheme"),
    pytest.param(scope(origin="https://example.com"), False, id="origin-without-host"),
    pytest.param(
        scope(host="tokenwire.internal:8000", origin="https://chat.example.com"),
        True,
        id="allowed",
    ),
    pytest.param(
        scope(host="tokenwire.internal:8000", origin="https://chat.example.com/"),
        True,
        id="allowed-trailing-slash",
    ),
    pytest.param(
        scope(host="tokenwire.internal:8000", origin="http://localhost:5173"),
        True,
        id="allowed-with-port",
    ),
    pytest.param(
        scope(host="tokenwire.internal:8000", origin="http://chat.example.com"),
        False,
        id="allowed-host-other-scheme",
    ),
    pytest.param(
        scope(host="tokenwire.internal:8000", origin="https://chat.example.com:8443"),
        False,
        id="allowed-host-other-port",
    ),
    pytest.param(
        scope(host="tokenwire.internal:8000", origin="https://www.chat.example.com"),
        False,
        id="allowed-subdomain",
    ),
]


@pytest.mark.parametrize(("scope_", "allowed"), ORIGINS)
def test_origin_allowed(scope_: Any, allowed: bool) -> None:
    assert origin_allowed(scope_, ALLOWED) is allowed


def test_origin_allowed_without_an_allowed_list() -> None:
    assert origin_allowed(scope(host="a.test", origin="https://a.test"), ()) is True
    assert origin_allowed(scope(host="a.test", origin="https://b.test"), ()) is False


# ---- cookies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "name", "expected"),
    [
        pytest.param({"cookie": "tw_id=abc.def"}, COOKIE_NAME, "abc.def", id="only"),
        pytest.param({"cookie": "a=1; tw_id=abc.def; b=2"}, COOKIE_NAME, "abc.def", id="middle"),
        pytest.param({"cookie": "a=1;tw_id=abc.def"}, COOKIE_NAME, "abc.def", id="no-space"),
        pytest.param({"cookie": "tw_id=abc; a=1"}, COOKIE_NAME, "abc", id="first"),
        pytest.param({"cookie": "a=1; tw_id=x=y"}, COOKIE_NAME, "x=y", id="value-with-equals"),
        pytest.param({"cookie": "tw_id=one; tw_id=two"}, COOKIE_NAME, "one", id="twice-first-wins"),
        pytest.param({"cookie": "a=1; b=2"}, COOKIE_NAME, None, id="absent"),
        pytest.param({"cookie": "xtw_id=1; tw_idx=2"}, COOKIE_NAME, None, id="similar-names"),
        pytest.param({"cookie": ""}, COOKIE_NAME, None, id="empty-header"),
        pytest.param({"host": "example.com"}, COOKIE_NAME, None, id="no-header"),
        pytest.param({"cookie": "a=1; session=s; b=2"}, "session", "s", id="other-name"),
        pytest.param({"cookie": "tw_id="}, COOKIE_NAME, "", id="empty-value"),
    ],
)
def test_read_cookie(headers: dict[str, str], name: str, expected: str | None) -> None:
    assert read_cookie(scope(**headers), name) == expected


def test_cookie_round_trip_through_a_header() -> None:
    identity = Identity(SECRET)
    user, value = identity.issue()
    set_cookie = cookie_header(value, secure=False).decode()
    name_value = set_cookie.split(";")[0]
    assert identity.verify(read_cookie(scope(cookie=f"theme=dark; {name_value}"))) == user


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_cookie_header(secure: bool) -> None:
    header = cookie_header("u.sig", secure)
    assert isinstance(header, bytes)
    first, *attributes = [part.strip() for part in header.decode().split(";")]
    assert first == f"{COOKIE_NAME}=u.sig"
    assert "HttpOnly" in attributes
    assert "SameSite=Lax" in attributes
    assert "Path=/" in attributes
    assert f"Max-Age={COOKIE_MAX_AGE}" in attributes
    assert ("Secure" in attributes) is secure


# ---- the cookie on the wire ----------------------------------------------------------------


def _set_cookie(response: httpx.Response) -> list[str]:
    header = response.headers["set-cookie"]
    return [part.strip() for part in header.split(";")]


async def test_live_cookie_attributes(make_server: Any) -> None:
    plain = make_server()
    async with httpx.AsyncClient(base_url=plain.url, timeout=TIMEOUT) as http:
        first = await http.get("/api/conversations")
        attributes = _set_cookie(first)
        assert attributes[0].startswith(f"{COOKIE_NAME}=")
        assert {"HttpOnly", "SameSite=Lax", "Path=/"} <= set(attributes)
        assert "Secure" not in attributes
        # Once held, it is not issued again.
        assert "set-cookie" not in (await http.get("/api/conversations")).headers
        # Behind a TLS-terminating proxy that uvicorn trusts (127.0.0.1 by default), the
        # request is HTTPS: the cookie is Secure.
        http.cookies.clear()
        proxied = await http.get("/api/conversations", headers={"X-Forwarded-Proto": "https"})
        assert "Secure" in _set_cookie(proxied)
    secure = make_server(cookie_secure="true")
    async with httpx.AsyncClient(base_url=secure.url, timeout=TIMEOUT) as http:
        assert "Secure" in _set_cookie(await http.get("/api/conversations"))


# ---- origin of state-changing HTTP requests ------------------------------------------------


async def test_cross_origin_posts_are_refused(make_server: Any) -> None:
    server = make_server(allowed_origins="https://chat.example.com")
    own = f"http://127.0.0.1:{server.port}"
    body = {"conversation": new_id(), "text": "hi"}
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        for origin in ("https://evil.example", "null", f"http://127.0.0.1:{server.port + 1}"):
            refused = await http.post(
                "/api/chat", json={"id": new_id(), **body}, headers={"Origin": origin}
            )
            assert refused.status_code == 403
            assert refused.json()["code"] == "unauthorized"
            assert "set-cookie" not in refused.headers  # refused before anything else
            cancel = await http.post(f"/api/streams/{new_id()}/cancel", headers={"Origin": origin})
            assert cancel.status_code == 403
            # Reads are not refused: without CORS headers, the other origin cannot read them.
            read = await http.get("/api/conversations", headers={"Origin": origin})
            assert read.status_code == 200
        for origin in (own, "https://chat.example.com", None):
            headers = {"Origin": origin} if origin else {}
            accepted = await http.post("/api/chat", json={"id": new_id(), **body}, headers=headers)
            assert accepted.status_code == 202, origin
    generations = server.metrics()["tokenwire_generations_total"]
    assert generations == 3  # only the accepted ones generated


# ---- no exception text to clients ----------------------------------------------------------

SECRET_DETAIL = "secret-detail-/etc/shadow-0x7f"


@get("/boom", sync_to_thread=False)
def boom() -> None:
    raise RuntimeError(SECRET_DETAIL)


def test_a_crash_answers_500_without_its_text(tmp_path: Path, caplog: Any) -> None:
    app = create_app(Settings(db=str(tmp_path / "h.db"), secret="s" * 32))
    app.register(boom)
    with TestClient(app) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {
        "type": "error",
        "id": None,
        "code": "internal",
        "message": "internal server error",
        "retryable": True,
    }
    assert SECRET_DETAIL not in response.text
    assert "Traceback" not in response.text and "RuntimeError" not in response.text
    # ... while the server's log has all of it, once, and /metrics counts it.
    logged = [r for r in caplog.records if r.exc_info and SECRET_DETAIL in str(r.exc_info[1])]
    assert len(logged) == 1
    assert app.state.runtime.metrics.contained_failures.counts["http"] == 1


def test_unknown_routes_do_not_echo_the_path(tmp_path: Path) -> None:
    app = create_app(Settings(db=str(tmp_path / "h.db"), secret="s" * 32))
    with TestClient(app) as client:
        response = client.post("/api/<script>alert(1)</script>")
    assert response.status_code in (404, 405)
    assert response.headers["content-type"].startswith("application/json")
    assert "<script>" not in response.text


# ---- secrets stay secret ---------------------------------------------------------------------

ID_SECRET = "identity-secret-0123456789-abcdef"
BEARER = "bearer-token-0123456789-abcdef"


@pytest.mark.parametrize(
    ("model", "shown"),
    [
        pytest.param("unauthorized", "provider returned HTTP 401", id="upstream-echoes-the-key"),
        pytest.param("html-error", "provider returned HTTP 502", id="upstream-html-page"),
        pytest.param("abort", "provider stream ended early", id="upstream-crash"),
    ],
)
async def test_provider_failures_show_no_secret_and_no_trace(
    make_server: Any, upstream: FakeOpenAI, model: str, shown: str
) -> None:
    server = make_server(
        provider="openai",
        openai_base_url=upstream.base_url,
        openai_api_key=API_KEY,
        openai_model=model,
        provider_timeout=5,
        secret=ID_SECRET,
        api_tokens=BEARER,
        log_level="debug",
    )
    client = await Client.connect(server)
    try:
        stream, _ = await start_chat(client, "hello")
        view = await client.until_end(stream)
    finally:
        await client.close()
    assert view.end is not None and view.end["code"] == "provider_error"
    assert view.end["message"].startswith(shown)
    everything_sent = json.dumps(client.frames)
    for secret in (API_KEY, ID_SECRET, BEARER, "internal secret trace", "Traceback"):
        assert secret not in everything_sent
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        for path in ("/metrics", "/healthz", "/readyz", "/api/conversations", "/"):
            text = (await http.get(path, headers={"Authorization": f"Bearer {BEARER}"})).text
            for secret in (API_KEY, ID_SECRET, BEARER):
                assert secret not in text, path
    log = server.log()
    for secret in (API_KEY, ID_SECRET, BEARER):
        assert secret not in log


# ---- no HTML from user or model text -------------------------------------------------------

HOSTILE = (
    "<script>alert(1)</script>\n\n<img src=x onerror=alert(1)>\n\n"
    '```"><svg/onload=alert(1)>\ncode <b>\n```\n\n'
    "- **<i>bold</i>** and *<a href=javascript:alert(1)>em</a>*\n"
)


def test_markdown_of_hostile_text_is_text_and_known_tags() -> None:
    markdown = MarkdownStream()
    ops = [*markdown.feed(HOSTILE), *markdown.finish()]
    shown = "".join(op[1] for op in ops if op[0] == "text")
    assert "<script>alert(1)</script>" in shown and "<img src=x onerror=alert(1)>" in shown
    for op in ops:
        if op[0] == "open":
            assert op[1] in TAGS
            # The only attribute value: a code block's language, letters and digits only.
            assert len(op) == 2 or all(c.isalnum() or c in "_+-.#" for c in op[2])


BROWSER_SOURCES = [
    *sorted((ROOT / "frontend" / "tokenwire").rglob("*.py")),
    ROOT / "frontend" / "main.py",
]
# DOM sinks that parse HTML or run code; the client builds every node with createElement
# and sets text with textContent, createTextNode or appendData.
HTML_SINKS = {"innerHTML", "outerHTML", "insertAdjacentHTML", "write", "writeln", "eval"}


@pytest.mark.parametrize("path", BROWSER_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_browser_code_uses_no_html_sink(path: Path) -> None:
    tree = ast.parse(path.read_text())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    used |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not used & HTML_SINKS


# ---- WebSocket message size ----------------------------------------------------------------


async def test_a_message_beyond_the_hard_limit_closes_with_1009(server: Server) -> None:
    bystander = await Client.connect(server)
    async with connect(server.ws_url, max_size=None) as ws:
        await ws.recv()  # hello
        with pytest.raises(ConnectionClosed) as closed:
            # Beyond max(4 x 64 KiB, 1 MiB). The server may close before the whole frame
            # is written: then `send` itself reports the close.
            await ws.send("x" * (1024 * 1024 + 1))
            while True:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    # Nobody else noticed.
    stream, _ = await start_chat(bystander, "still here")
    assert (await bystander.until_end(stream)).end is not None
    await bystander.close()


# ---- response headers ------------------------------------------------------------------------


async def test_every_http_response_carries_the_security_headers(server: Server) -> None:
    expected = {
        "x-content-type-options": "nosniff",
        "x-frame-options": "DENY",
        "content-security-policy": "frame-ancestors 'none'",
        "referrer-policy": "same-origin",
    }
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        responses = [
            await http.get("/"),
            await http.get("/api/conversations"),
            await http.get("/no/such/route"),
            await http.post("/api/chat", content=b"{"),
            await http.post("/api/chat", json={}, headers={"Origin": "https://evil.example"}),
        ]
    assert [r.status_code for r in responses] == [200, 200, 404, 400, 403]
    for response in responses:
        assert {k: response.headers.get(k) for k in expected} == expected, response.url
