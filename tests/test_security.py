"""The identity cookie and the WebSocket origin check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from backend.security import (
    COOKIE_MAX_AGE,
    COOKIE_NAME,
    Identity,
    cookie_header,
    origin_allowed,
    read_cookie,
)

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
