"""Page figures for the browser client, per runtime: time from navigation to a usable
input (cold cache and warm), bytes transferred, and the longest main-thread task while a
fast stream (500 tokens/s) renders. Prints a Markdown table; asserts nothing.

    python -m bench.page_load [--repeat 3]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from pathlib import Path

from playwright.sync_api import BrowserContext, sync_playwright

from e2e.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.harness import start_server

LONGTASKS_JS = """
window.__longest = 0;
new PerformanceObserver(list => {
  for (const e of list.getEntries()) window.__longest = Math.max(window.__longest, e.duration);
}).observe({type: 'longtask', buffered: true});
"""
BYTES_JS = """
performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))
  .reduce((sum, e) => sum + (e.transferSize || 0), 0)
"""


def load(context: BrowserContext, url: str) -> tuple[float, int]:
    page = context.pages[0] if context.pages else context.new_page()
    start = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("#app[data-ready=true]", timeout=60_000)
    elapsed = time.perf_counter() - start
    return elapsed, int(page.evaluate(BYTES_JS))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tokenwire-bench-"))
    server = start_server(
        tmp, demo_first_token_delay=0, demo_tokens_per_second=500, demo_paragraphs=12
    )
    rows = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for runtime, query in [("MicroPython", ""), ("Pyodide", "?runtime=pyodide")]:
                url = f"{server.url}/{query}"
                cold, warm, cold_bytes, warm_bytes, longest = [], [], [], [], []
                for _ in range(args.repeat):
                    context = browser.new_context()  # an empty cache: a first visit
                    seconds, size = load(context, url)
                    cold.append(seconds)
                    cold_bytes.append(size)
                    seconds, size = load(context, url)  # the same visitor comes back
                    warm.append(seconds)
                    warm_bytes.append(size)
                    longest.append(longest_task_while_streaming(context, url))
                    context.close()
                rows.append((runtime, cold, warm, cold_bytes, warm_bytes, longest))
            browser.close()
    finally:
        server.stop(signal.SIGKILL)

    def fmt(values: list[float], scale: float = 1.0, unit: str = "") -> str:
        med = statistics.median(values) * scale
        return f"{med:,.0f}{unit} ({min(values) * scale:,.0f} to {max(values) * scale:,.0f})"

    print(f"\nmedian (min to max) of {args.repeat} runs\n")
    print(
        "| runtime | cold: usable input | warm | bytes, cold | bytes, warm "
        "| longest task at 500 tok/s |"
    )
    print("|---|---|---|---|---|---|")
    for runtime, cold, warm, cb, wb, longest in rows:
        print(
            f"| {runtime} | {fmt(cold, 1000, ' ms')} | {fmt(warm, 1000, ' ms')} | "
            f"{fmt([float(b) for b in cb], 1 / 1024, ' KB')} | "
            f"{fmt([float(b) for b in wb], 1 / 1024, ' KB')} | {fmt(longest, 1, ' ms')} |"
        )


if __name__ == "__main__":
    main()
