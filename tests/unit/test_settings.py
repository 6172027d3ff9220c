"""Configuration from the environment: defaults, parsing, and messages that name the variable."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from backend.settings import (
    DEFAULT_HEARTBEAT,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_TEXT_CHARS,
    DEFAULT_OUTBOX_BYTES,
    DEFAULT_PORT,
    DEFAULT_STREAM_TTL,
    LOG_LEVELS,
    PROVIDERS,
    Settings,
    SettingsError,
    env_name,
)

FIELDS = dataclasses.fields(Settings)
NUMERIC = [f for f in FIELDS if f.type in ("int", "float", int, float)]
INTS = {f.name for f in NUMERIC if f.type in ("int", int)}


def default_of(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return getattr(Settings.from_env({}), field.name)  # `node`: computed per process


def load(**env: str) -> Settings:
    return Settings.from_env(env)


def refused(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    return str(caught.value)


def test_numeric_fields_found() -> None:
    # Guards the tables below against a change in how the fields are annotated.
    assert {"port", "heartbeat", "max_frame_bytes", "stream_ttl"} <= {f.name for f in NUMERIC}
    assert "port" in INTS
    assert "heartbeat" not in INTS


def test_defaults_from_an_empty_environment() -> None:
    loaded = Settings.from_env({})
    for field in FIELDS:
        if field.default is not dataclasses.MISSING:
            assert getattr(loaded, field.name) == field.default, field.name
    assert loaded.node  # from the host name and process id
    assert (loaded.host, loaded.port) == (DEFAULT_HOST, DEFAULT_PORT)
    assert (loaded.heartbeat, loaded.heartbeat_timeout) == (30.0, 10.0)
    assert (DEFAULT_HEARTBEAT, DEFAULT_HEARTBEAT_TIMEOUT) == (30.0, 10.0)
    assert loaded.max_frame_bytes == DEFAULT_MAX_FRAME_BYTES == 64 * 1024
    assert loaded.max_text_chars == DEFAULT_MAX_TEXT_CHARS == 32_000
    assert loaded.outbox_bytes == DEFAULT_OUTBOX_BYTES == 1024 * 1024
    assert loaded.stream_ttl == DEFAULT_STREAM_TTL == 600.0
    assert loaded.provider == "demo"
    assert loaded.secret is None
    assert loaded.allowed_origins == ()
    assert loaded.cookie_secure is False


@pytest.mark.parametrize(
    ("field", "variable"),
    [
        pytest.param("port", "PORT", id="port"),
        pytest.param("host", "TOKENWIRE_HOST", id="host"),
        pytest.param("heartbeat_timeout", "TOKENWIRE_HEARTBEAT_TIMEOUT", id="heartbeat_timeout"),
        pytest.param("openai_api_key", "TOKENWIRE_OPENAI_API_KEY", id="openai_api_key"),
    ],
)
def test_env_name(field: str, variable: str) -> None:
    assert env_name(field) == variable


def test_port_is_read_from_port() -> None:
    assert load(PORT="9123").port == 9123
    assert load(TOKENWIRE_PORT="9123").port == DEFAULT_PORT


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
@pytest.mark.parametrize("blank", ["", "   "], ids=["empty", "spaces"])
def test_empty_value_means_default(field: dataclasses.Field[Any], blank: str) -> None:
    assert getattr(Settings.from_env({env_name(field.name): blank}), field.name) == default_of(
        field
    )


@pytest.mark.parametrize("field", NUMERIC, ids=[f.name for f in NUMERIC])
def test_numeric_default_written_out_is_accepted(field: dataclasses.Field[Any]) -> None:
    name = env_name(field.name)
    loaded = Settings.from_env({name: f" {field.default} "})
    assert getattr(loaded, field.name) == field.default
    assert type(getattr(loaded, field.name)) is type(field.default)


BAD_NUMBERS = [
    pytest.param("abc", id="word"),
    pytest.param("12abc", id="trailing-letters"),
    pytest.param("-1", id="negative"),
    pytest.param("1000000000000", id="huge"),
    pytest.param("nan", id="nan"),
    pytest.param("inf", id="inf"),
    pytest.param("-inf", id="minus-inf"),
]


@pytest.mark.parametrize("raw", BAD_NUMBERS)
@pytest.mark.parametrize("field", NUMERIC, ids=[f.name for f in NUMERIC])
def test_numeric_rejects(field: dataclasses.Field[Any], raw: str) -> None:
    name = env_name(field.name)
    message = refused({name: raw})
    assert message.startswith(f"{name} must be "), message
    assert "between" in message


@pytest.mark.parametrize("raw", ["1.5", "1e3", "0x10"], ids=["fraction", "exponent", "hex"])
@pytest.mark.parametrize("field", sorted(INTS))
def test_integers_reject_non_integers(field: str, raw: str) -> None:
    name = env_name(field)
    message = refused({name: raw})
    assert message.startswith(f"{name} must be an integer"), message


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        pytest.param({"TOKENWIRE_HEARTBEAT": "5"}, "heartbeat", 5.0, id="float-from-int"),
        pytest.param({"TOKENWIRE_HEARTBEAT": "0.5"}, "heartbeat", 0.5, id="float"),
        pytest.param({"TOKENWIRE_STREAM_TTL": "0"}, "stream_ttl", 0.0, id="zero-ttl"),
        pytest.param({"TOKENWIRE_MAX_TEXT_CHARS": "1"}, "max_text_chars", 1, id="int"),
        pytest.param({"TOKENWIRE_OUTBOX_BYTES": "2048"}, "outbox_bytes", 2048, id="outbox"),
        pytest.param({"PORT": "0"}, "port", 0, id="port-zero"),
        pytest.param({"PORT": "65535"}, "port", 65535, id="port-max"),
    ],
)
def test_numeric_values(env: dict[str, str], field: str, expected: Any) -> None:
    value = getattr(Settings.from_env(env), field)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        pytest.param({"PORT": "65536"}, "PORT", id="port-too-high"),
        pytest.param({"TOKENWIRE_HEARTBEAT": "0"}, "TOKENWIRE_HEARTBEAT", id="heartbeat-zero"),
        pytest.param(
            {"TOKENWIRE_MAX_FRAME_BYTES": "1023"}, "TOKENWIRE_MAX_FRAME_BYTES", id="frame-tiny"
        ),
        pytest.param({"TOKENWIRE_MAX_TEXT_CHARS": "0"}, "TOKENWIRE_MAX_TEXT_CHARS", id="text-0"),
        pytest.param(
            {"TOKENWIRE_STREAM_MAX_TOKENS": "0"}, "TOKENWIRE_STREAM_MAX_TOKENS", id="tokens-0"
        ),
    ],
)
def test_numeric_lower_bounds(env: dict[str, str], variable: str) -> None:
    assert refused(env).startswith(f"{variable} must be between ")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *[pytest.param(raw, True, id=raw) for raw in ("1", "true", "TRUE", "yes", "on", "On")],
        *[pytest.param(raw, False, id=raw) for raw in ("0", "false", "False", "no", "off")],
    ],
)
def test_booleans(raw: str, expected: bool) -> None:
    assert load(TOKENWIRE_COOKIE_SECURE=raw).cookie_secure is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "y", "enabled"])
def test_boolean_rejects(raw: str) -> None:
    message = refused({"TOKENWIRE_COOKIE_SECURE": raw})
    assert message.startswith("TOKENWIRE_COOKIE_SECURE must be true or false"), message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [pytest.param(p, p, id=p) for p in PROVIDERS] + [pytest.param("OpenAI", "openai", id="case")],
)
def test_provider(raw: str, expected: str) -> None:
    assert load(TOKENWIRE_PROVIDER=raw).provider == expected


def test_provider_rejects_unknown() -> None:
    message = refused({"TOKENWIRE_PROVIDER": "anthropic"})
    assert message.startswith("TOKENWIRE_PROVIDER must be one of demo, openai"), message


@pytest.mark.parametrize("level", [*LOG_LEVELS, "DEBUG"])
def test_log_level(level: str) -> None:
    assert load(TOKENWIRE_LOG_LEVEL=level).log_level == level.lower()


def test_log_level_rejects_unknown() -> None:
    assert refused({"TOKENWIRE_LOG_LEVEL": "verbose"}).startswith("TOKENWIRE_LOG_LEVEL must be")


def test_openai_base_url_must_be_http() -> None:
    env = {"TOKENWIRE_PROVIDER": "openai", "TOKENWIRE_OPENAI_BASE_URL": "api.openai.com/v1"}
    message = refused(env)
    assert message.startswith("TOKENWIRE_OPENAI_BASE_URL must start with http:// or https://")
    env["TOKENWIRE_OPENAI_BASE_URL"] = "http://127.0.0.1:9000/v1"
    assert Settings.from_env(env).openai_base_url == "http://127.0.0.1:9000/v1"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("https://chat.example.com", ("https://chat.example.com",), id="one"),
        pytest.param(
            "https://chat.example.com/, http://localhost:5173",
            ("https://chat.example.com", "http://localhost:5173"),
            id="two-trailing-slash",
        ),
        pytest.param(
            " https://a.test ,, http://b.test:8080 ,",
            ("https://a.test", "http://b.test:8080"),
            id="spaces-and-empty-items",
        ),
        pytest.param(",", (), id="only-commas"),
    ],
)
def test_allowed_origins(raw: str, expected: tuple[str, ...]) -> None:
    assert load(TOKENWIRE_ALLOWED_ORIGINS=raw).allowed_origins == expected


@pytest.mark.parametrize(
    "raw",
    ["chat.example.com", "https://a.test, b.test", "ws://chat.example.com", "*"],
    ids=["no-scheme", "second-no-scheme", "ws-scheme", "wildcard"],
)
def test_allowed_origins_rejects(raw: str) -> None:
    message = refused({"TOKENWIRE_ALLOWED_ORIGINS": raw})
    assert message.startswith("TOKENWIRE_ALLOWED_ORIGINS must be a comma-separated list"), message


def test_short_secret_is_refused_with_the_fix() -> None:
    message = refused({"TOKENWIRE_SECRET": "x" * 15})
    assert message.startswith("TOKENWIRE_SECRET must be at least 16 characters")
    assert "secrets.token_urlsafe(32)" in message


def test_secret_of_16_characters_is_accepted() -> None:
    assert load(TOKENWIRE_SECRET="x" * 16).secret == "x" * 16


def test_strings_are_trimmed() -> None:
    loaded = load(TOKENWIRE_HOST=" 0.0.0.0 ", TOKENWIRE_NODE=" web-1 ")
    assert (loaded.host, loaded.node) == ("0.0.0.0", "web-1")


def test_the_process_environment_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWIRE_DEMO_PARAGRAPHS", "7")
    assert Settings.from_env().demo_paragraphs == 7
    monkeypatch.setenv("TOKENWIRE_DEMO_PARAGRAPHS", "many")
    with pytest.raises(SettingsError, match=r"^TOKENWIRE_DEMO_PARAGRAPHS "):
        Settings.from_env()


def test_token_quota_defaults_and_off() -> None:
    loaded = Settings.from_env({})
    assert (loaded.token_quota, loaded.token_quota_window) == (200_000, 3600.0)
    assert load(TOKENWIRE_TOKEN_QUOTA="0").token_quota == 0  # no quota


@pytest.mark.parametrize(
    ("variable", "raw", "hint"),
    [
        pytest.param("TOKENWIRE_TOKEN_QUOTA", "-5", "0 for no quota", id="quota-negative"),
        pytest.param("TOKENWIRE_TOKEN_QUOTA", "lots", "0 for no quota", id="quota-word"),
        pytest.param(
            "TOKENWIRE_TOKEN_QUOTA_WINDOW", "0", "TOKENWIRE_TOKEN_QUOTA refills", id="window-0"
        ),
    ],
)
def test_token_quota_errors_say_what_the_value_means(variable: str, raw: str, hint: str) -> None:
    message = refused({variable: raw})
    assert message.startswith(f"{variable} must be "), message
    assert message.endswith(hint), message
