"""Figure 5: the chat page in headless Chromium, per runtime: time from navigation to a
usable input (cold cache and warm), bytes transferred, and the longest main-thread task
while a fast stream (500 tokens/s) renders.

    python -m bench.page_load [--repeat 3] [--smoke] [--out DIR]

`run(config)` is what `python -m bench` calls; the smoke size is one cold and one warm load
of MicroPython only (no streaming). Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Final

from playwright.sync_api import BrowserContext, Request, sync_playwright

from bench.common import RESULTS, Config, Figure, bar_plot, progress
from e2e.conftest import CHROMIUM, CHROMIUM_ARGS
from harness.server import start_server

TITLE: Final = "Page load: time to a usable chat input and bytes, per browser runtime"
RUNTIMES: Final = (("MicroPython", ""), ("Pyodide", "?runtime=pyodide"))
STREAM_TOKENS_PER_SECOND: Final = 500
LONGTASKS_JS = """
window.__longest = 0;
new PerformanceObserver(list => {
  for (const e of list.getEntries()) window.__longest = Math.max(window.__longest, e.duration);
}).observe({type: 'longtask', buffered: true});
"""
# The page's own resource timings miss what its service worker fetches (the interpreter
# and PyScript, precached on the first visit), so bytes are counted from every request of
# the browser context, the service worker's included. Chromium reports those only with
# this switch, read when Playwright's driver starts.
os.environ.setdefault("PW_EXPERIMENTAL_SERVICE_WORKER_NETWORK_EVENTS", "1")
SETTLE = 0.5  # seconds after the input is usable: requests still finishing are counted


def load(context: BrowserContext, url: str) -> tuple[float, int]:
    """Seconds to a usable input, and bytes received over the network (bodies as sent,
    compressed, plus headers) by the page and its service worker."""
    finished: list[Request] = []

    def on_finished(request: Request) -> None:  # a bound builtin cannot be a handler
        finished.append(request)

    context.on("requestfinished", on_finished)
    try:
        page = context.pages[0] if context.pages else context.new_page()
        start = time.perf_counter()
        page.goto(url)
        page.wait_for_selector("#app[data-ready=true]", timeout=60_000)
        elapsed = time.perf_counter() - start
        time.sleep(SETTLE)
    finally:
        context.remove_listener("requestfinished", on_finished)
    received = 0
    for request in finished:
        sizes = request.sizes()
        received += sizes["responseBodySize"] + sizes["responseHeadersSize"]
    return elapsed, received


def longest_task_while_streaming(context: BrowserContext, url: str) -> float:
    page = context.new_page()
    page.add_init_script(LONGTASKS_JS)
    page.goto(url)
    page.wait_for_selector("#app[data-ready=true]", timeout=60_000)
    page.evaluate("window.__longest = 0")
    page.fill("#input", "A long answer, fast")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-status=done]", timeout=120_000)
    return float(page.evaluate("window.__longest"))


def run(config: Config) -> Figure:
    figure = Figure("page_load", TITLE)
    runtimes = RUNTIMES[:1] if config.smoke else RUNTIMES
    with tempfile.TemporaryDirectory(prefix="benchcore-page-") as tmp:
        server = start_server(
            Path(tmp),
            demo_first_token_delay=0,
            demo_tokens_per_second=STREAM_TOKENS_PER_SECOND,
            demo_paragraphs=12,
        )
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                runs = [(r, q) for _ in range(config.repetitions) for r, q in runtimes]
                for runtime, query in progress(runs, desc="page load"):
                    url = f"{server.url}/{query}"
                    context = browser.new_context()  # an empty cache: a first visit
                    seconds, size = load(context, url)
                    figure.row(runtime, "cold: usable input", "ms").samples.append(seconds * 1e3)
                    figure.row(runtime, "bytes, cold", "KB").samples.append(size / 1024)
                    seconds, size = load(context, url)  # the same visitor comes back
                    figure.row(runtime, "warm: usable input", "ms").samples.append(seconds * 1e3)
                    figure.row(runtime, "bytes, warm", "KB").samples.append(size / 1024)
                    if not config.smoke:
                        figure.row(
                            runtime,
                            f"longest task at {STREAM_TOKENS_PER_SECOND} tokens/s",
                            "ms",
                        ).samples.append(longest_task_while_streaming(context, url))
                    context.close()
                browser.close()
        finally:
            server.stop(signal.SIGKILL)
    figure.notes.append(
        "Headless Chromium and the server on the same machine; cold = a new browser context "
        "(empty cache), warm = the same context loading the page again. Bytes are what the "
        "page and its service worker received (compressed bodies and headers); warm loads "
        "only revalidate."
    )
    bars = {
        f"{row.peer}, {row.metric.split(':')[0]}": (
            row.median,
            min(row.samples),
            max(row.samples),
        )
        for row in figure.rows
        if row.metric.endswith("usable input")
    }
    figure.plots.append(
        bar_plot(config.out / "page_load.png", "Time to a usable chat input", "ms", bars)
    )
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(run(Config(out=args.out, smoke=args.smoke, repeat=args.repeat)).markdown())


if __name__ == "__main__":
    main()
