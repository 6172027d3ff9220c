"""`/metrics`: the pure renderer, a strict parser of the Prometheus text format, and the
live route counting what a real server did."""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from backend.web.metrics import HELP, LATENCY_BUCKETS, Histogram, Metrics, Sample, render
from harness.server import ROOT, TIMEOUT, Client, Server, new_id, start_chat, wait_for

# ---- a strict parser of the text format (0.0.4) ------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_HELP = re.compile(rf"# HELP ({_NAME}) (.*)")
_TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")
_SAMPLE = re.compile(rf"({_NAME})(?:\{{(.*)\}})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


@dataclass
class Family:
    name: str
    kind: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def parse(text: str) -> dict[str, Family]:
    """Every family in `text`; fails on anything a strict scraper would refuse: a sample
    before its HELP and TYPE, a name or label that is not valid, a value that is not a
    float, a family declared twice, a counter not named `_total`, histogram buckets that
    are not cumulative or do not end in `+Inf` equal to `_count`."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, Family] = {}
    help_of: dict[str, str] = {}
    current: Family | None = None
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}: {line!r}"
        assert line, f"{where}: empty line"
        if line.startswith("# HELP "):
            match = _HELP.fullmatch(line)
            assert match, f"{where}: malformed HELP"
            assert match[1] not in help_of and match[1] not in families, f"{where}: twice"
            help_of[match[1]] = match[2]
        elif line.startswith("# TYPE "):
            match = _TYPE.fullmatch(line)
            assert match, f"{where}: malformed TYPE"
            name, kind = match[1], match[2]
            assert name in help_of, f"{where}: TYPE before HELP"
            assert name not in families, f"{where}: family declared twice"
            current = families[name] = Family(name, kind, help_of[name])
        else:
            assert not line.startswith("#"), f"{where}: unknown comment"
            match = _SAMPLE.fullmatch(line)
            assert match, f"{where}: malformed sample"
            name, labels_text, raw = match[1], match[2], match[3]
            assert current is not None, f"{where}: sample before any TYPE"
            suffixes = _SUFFIXES.get(current.kind, ("",))
            assert any(name == current.name + s for s in suffixes), f"{where}: not in family"
            labels: dict[str, str] = {}
            if labels_text:
                for part in labels_text.split(","):
                    label = _LABEL.fullmatch(part)
                    assert label, f"{where}: malformed label {part!r}"
                    labels[label[1]] = label[2]
            value = float(raw)  # raises on anything that is not a float (+Inf, NaN are)
            current.samples.append((name, labels, value))
    for family in families.values():
        assert family.samples, f"{family.name}: no samples"
        if family.kind == "counter":
            assert family.name.endswith("_total"), f"{family.name}: counter without _total"
            assert all(v >= 0 for _, _, v in family.samples), f"{family.name}: negative"
        if family.kind == "histogram":
            _check_histogram(family)
    return families


def _check_histogram(family: Family) -> None:
    buckets = [(s[1]["le"], s[2]) for s in family.samples if s[0].endswith("_bucket")]
    counts = [v for n, _, v in family.samples if n == family.name + "_count"]
    assert buckets and buckets[-1][0] == "+Inf", f"{family.name}: no +Inf bucket"
    bounds = [float(le) for le, _ in buckets]
    assert bounds == sorted(bounds), f"{family.name}: bounds out of order"
    values = [v for _, v in buckets]
    assert values == sorted(values), f"{family.name}: buckets not cumulative"
    assert counts == [values[-1]], f"{family.name}: _count differs from the +Inf bucket"


def values(families: dict[str, Family]) -> dict[str, float]:
    """Unlabelled samples by name, and each histogram's `_count`."""
    found = {}
    for family in families.values():
        for name, labels, value in family.samples:
            if not labels:
                found[name] = value
    return found


def scrape(server: Server) -> dict[str, Family]:
    response = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


# ---- the parser refuses what it should -----------------------------------------------------

GOOD = "# HELP a_total A\n# TYPE a_total counter\na_total 1\n"
BAD_EXPOSITIONS = [
    pytest.param("a_total 1\n", id="sample-without-type"),
    pytest.param("# TYPE a_total counter\na_total 1\n", id="type-without-help"),
    pytest.param(GOOD.replace("a_total 1", "a_total one"), id="value-not-a-float"),
    pytest.param(GOOD.replace("a_total 1", "a-total 1"), id="invalid-name"),
    pytest.param(GOOD.replace("a_total 1", "b_total 1"), id="sample-of-another-family"),
    pytest.param(GOOD.replace("a_total", "a"), id="counter-without-total"),
    pytest.param(GOOD + GOOD, id="declared-twice"),
    pytest.param(GOOD.rstrip("\n"), id="no-final-newline"),
    pytest.param(
        '# HELP h H\n# TYPE h histogram\nh_bucket{le="1.0"} 2\nh_bucket{le="+Inf"} 1\n'
        "h_sum 1\nh_count 1\n",
        id="histogram-not-cumulative",
    ),
    pytest.param(
        '# HELP h H\n# TYPE h histogram\nh_bucket{le="1.0"} 1\nh_sum 1\nh_count 1\n',
        id="histogram-without-inf",
    ),
    pytest.param(
        '# HELP h H\n# TYPE h histogram\nh_bucket{le=1.0} 1\nh_bucket{le="+Inf"} 1\n'
        "h_sum 1\nh_count 1\n",
        id="unquoted-label",
    ),
]


@pytest.mark.parametrize("text", BAD_EXPOSITIONS)
def test_parser_refuses(text: str) -> None:
    with pytest.raises((AssertionError, ValueError)):
        parse(text)


def test_parser_accepts_good() -> None:
    assert values(parse(GOOD)) == {"a_total": 1.0}


# ---- render: a pure function -----------------------------------------------------------------


def test_render_exact() -> None:
    histogram = Histogram(buckets=(0.1, 1.0), counts=[0, 0, 0])
    for seconds in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(seconds)
    metrics = Metrics(heartbeat_timeouts=2, first_token_seconds=histogram)
    text = render(metrics, [Sample("tokenwire_connections", "gauge", "Open\nconnections", 3)])
    assert text.endswith(
        "# HELP tokenwire_first_token_seconds " + HELP["first_token_seconds"] + "\n"
        "# TYPE tokenwire_first_token_seconds histogram\n"
        'tokenwire_first_token_seconds_bucket{le="0.1"} 2\n'
        'tokenwire_first_token_seconds_bucket{le="1.0"} 3\n'
        'tokenwire_first_token_seconds_bucket{le="+Inf"} 4\n'
        "tokenwire_first_token_seconds_sum 3.65\n"
        "tokenwire_first_token_seconds_count 4\n"
        "# HELP tokenwire_connections Open\\nconnections\n"
        "# TYPE tokenwire_connections gauge\n"
        "tokenwire_connections 3\n"
    )
    assert (
        "# HELP tokenwire_heartbeat_timeouts_total " + HELP["heartbeat_timeouts"] + "\n"
        "# TYPE tokenwire_heartbeat_timeouts_total counter\n"
        "tokenwire_heartbeat_timeouts_total 2\n"
    ) in text
    parse(text)


def test_render_every_counter_and_the_default_histogram() -> None:
    families = parse(render(Metrics()))
    for name in Metrics.__dataclass_fields__:
        assert f"tokenwire_{name}_total" in families or f"tokenwire_{name}" in families
    buckets = families["tokenwire_first_token_seconds"].samples
    assert [s[1].get("le") for s in buckets[:-2]] == [
        *(repr(b) for b in LATENCY_BUCKETS),
        "+Inf",
    ]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param(0, "0", id="zero"),
        pytest.param(12, "12", id="int"),
        pytest.param(0.25, "0.25", id="float"),
        pytest.param(math.inf, "+Inf", id="inf"),
        pytest.param(-math.inf, "-Inf", id="minus-inf"),
        pytest.param(math.nan, "NaN", id="nan"),
        pytest.param(1e21, "1e+21", id="large"),
    ],
)
def test_render_values(value: float, shown: str) -> None:
    text = render(Metrics(), [Sample("x", "gauge", "x", value)])
    assert text.endswith(f"\nx {shown}\n")
    parse(text)


# ---- the live route --------------------------------------------------------------------------

GAUGES = (
    "tokenwire_connections",
    "tokenwire_sse_responses",
    "tokenwire_streams_active",
    "tokenwire_stream_logs",
    "tokenwire_subscriptions",
    "tokenwire_broker_healthy",
    "tokenwire_tasks",
    "process_resident_memory_bytes",
    "process_open_fds",
)


def test_every_metric_is_exposed_and_documented(server: Server) -> None:
    families = scrape(server)
    for gauge in GAUGES:
        assert families[gauge].kind == "gauge"
    assert values(families)["tokenwire_broker_healthy"] == 1
    assert values(families)["process_resident_memory_bytes"] > 10 * 1024 * 1024
    assert values(families)["process_open_fds"] > 3
    readme = (ROOT / "README.md").read_text()
    operations = readme.split("## Operations", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in families if f"`{name}`" not in operations]
    assert not missing, f"document these in README.md's Operations section: {missing}"


async def test_a_chat_moves_the_counters(server: Server) -> None:
    before = values(scrape(server))
    client = await Client.connect(server)
    try:
        stream, _ = await start_chat(client, "count me")
        view = await client.until_end(stream)
        assert view.end is not None and view.end["type"] == "done"
        assert values(scrape(server))["tokenwire_connections"] >= 1
    finally:
        await client.close()
    after = values(scrape(server))
    assert after["tokenwire_generations_total"] >= before["tokenwire_generations_total"] + 1
    assert (
        after["tokenwire_tokens_generated_total"]
        >= before["tokenwire_tokens_generated_total"] + view.last
    )
    assert after["tokenwire_tokens_sent_total"] >= before["tokenwire_tokens_sent_total"] + view.last
    assert (
        after["tokenwire_token_frames_sent_total"]
        >= before["tokenwire_token_frames_sent_total"] + 1
    )
    first = "tokenwire_first_token_seconds_count"
    assert after[first] >= before[first] + 1


async def test_replays_and_resumes_are_counted(server: Server) -> None:
    client = await Client.connect(server)
    try:
        stream, conversation = await start_chat(client, "replay me")
        view = await client.until_end(stream)
        assert view.last > 3
        before = values(scrape(server))
        # The same chat again: acked, replayed, not generated.
        await client.send(type="chat", id=stream, conversation=conversation, text="replay me")
        await client.until(lambda f: f["type"] == "done" and f["id"] == stream)
        # A resume from the middle, served from the log.
        await client.send(type="resume", id=stream, after=3)
        await client.until(lambda f: f["type"] == "done" and f["id"] == stream)
    finally:
        await client.close()
    after = values(scrape(server))
    assert after["tokenwire_replays_total"] == before["tokenwire_replays_total"] + 1
    assert after["tokenwire_generations_total"] == before["tokenwire_generations_total"]
    recovered = "tokenwire_resumes_recovered_total"
    assert after[recovered] >= before[recovered] + 1
    # Over HTTP, a repeated POST is a replay too.
    body = {"id": new_id(), "conversation": new_id(), "text": "twice"}
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        assert (await http.post("/api/chat", json=body)).status_code == 202
        assert (await http.post("/api/chat", json=body)).status_code == 200
    assert values(scrape(server))["tokenwire_replays_total"] == after["tokenwire_replays_total"] + 1


async def test_expired_resumes_are_counted(make_server: Any) -> None:
    server = make_server(stream_ttl=0)  # a stream's log goes as soon as it ends
    client = await Client.connect(server)
    try:
        stream, _ = await start_chat(client, "forget me")
        await client.until_end(stream)
        await client.send(type="resume", id=stream, after=2)
        error = await client.until(lambda f: f["type"] == "error" and f.get("id") == stream)
        assert error["code"] == "stream_expired"
    finally:
        await client.close()
    assert values(scrape(server))["tokenwire_resumes_expired_total"] == 1


async def test_bad_frames_do_not_break_the_scrape(server: Server) -> None:
    client = await Client.connect(server)
    try:
        bad: list[str | bytes] = ["not json", "[]", '{"type": "shout"}', "{" * 10_000, b"\xff"]
        for frame_ in bad:
            await client.ws.send(frame_)
            frame = await client.until(lambda f: f["type"] == "error")
            assert frame["code"] == "bad_frame"
        families = scrape(server)
        assert values(families)["tokenwire_connections"] >= 1
    finally:
        await client.close()
    await wait_for(lambda: values(scrape(server))["tokenwire_connections"] == 0)


async def test_tasks_return_to_baseline_after_clients_leave(server: Server) -> None:
    await wait_for(lambda: values(scrape(server))["tokenwire_streams_active"] == 0)
    baseline = values(scrape(server))["tokenwire_tasks"]
    clients = [await Client.connect(server) for _ in range(5)]
    for client in clients:
        await start_chat(client, "leak check")
    during = values(scrape(server))["tokenwire_tasks"]
    assert during > baseline
    await asyncio.gather(*(c.close() for c in clients))
    await wait_for(lambda: values(scrape(server))["tokenwire_streams_active"] == 0)
    await wait_for(lambda: values(scrape(server))["tokenwire_tasks"] <= baseline)


def test_scrape_of_a_fresh_process_is_valid(tmp_path: Path, make_server: Any) -> None:
    families = scrape(make_server())
    assert values(families)["tokenwire_generations_total"] == 0
    assert values(families)["tokenwire_first_token_seconds_count"] == 0


async def test_refused_connections_are_counted(make_server: Any) -> None:
    server = make_server(max_connections_per_user=1)
    first = await Client.connect(server)
    try:
        with pytest.raises(InvalidStatus):
            await Client.connect(server, cookie=first.cookie)
    finally:
        await first.close()
    assert values(scrape(server))["tokenwire_connections_refused_total"] == 1
