"""The browser's own services for the other browser modules, each safe under MicroPython and
Pyodide alike: the clock, ids, localStorage, event listeners, timers and `fetch` with a
deadline returning parsed JSON.

Promises:
- no call here lets a JavaScript exception escape. A JS exception thrown by a synchronous
  call cannot be caught in MicroPython (FIELD-NOTES.md), so JSON is parsed in Python, and
  storage values are checked with `is_none` (Pyodide returns `jsnull` where MicroPython
  returns None). A failed request is a value ((None, None)), never an exception;
- every HTTP request has a deadline (`HTTP_TIMEOUT`): on a black-holed network nothing
  ever fails by itself;
- a listener's or timer's proxy lives as long as it can be called (listeners: the page).
"""

import json

import js
from pyscript import window
from pyscript.ffi import create_proxy, is_none

HTTP_TIMEOUT = 10.0  # seconds any HTTP request may take
# Seconds before trying again when the server said to retry without saying when
# (`retry_after`, docs/PROTOCOL.md "Error codes"), or when the network failed.
RETRY_DELAY = 2.0

_proxies = []  # the listeners' and intervals' proxies: they live as long as the page


def now():
    """Seconds on the page's monotonic clock."""
    return window.performance.now() / 1000.0


def new_id():
    """A fresh request or conversation id (a UUID4 without dashes, docs/PROTOCOL.md
    "Identifiers")."""
    return str(window.crypto.randomUUID()).replace("-", "")


def storage_get(key):
    value = window.localStorage.getItem(key)
    return None if is_none(value) else str(value)


def storage_set(key, value):
    window.localStorage.setItem(key, value)


def listen(target, event, handler):
    """`target.addEventListener(event, handler)`, the handler's proxy kept alive."""
    proxy = create_proxy(handler)
    _proxies.append(proxy)
    target.addEventListener(event, proxy)


def every(seconds, callback):
    """Run `callback` every `seconds`, for as long as the page lives."""
    proxy = create_proxy(lambda *_a: callback())
    _proxies.append(proxy)
    window.setInterval(proxy, int(seconds * 1000))


def later(seconds, callback):
    """Run `callback` after `seconds` (a JS timer; the proxy lives as long as it must)."""
    holder = []

    def fire(*_args):
        holder.clear()
        callback()

    proxy = create_proxy(fire)
    holder.append(proxy)
    window.setTimeout(proxy, int(seconds * 1000))


def http(url, method="GET", body=None, timeout=HTTP_TIMEOUT, signal=None):
    """The browser's `fetch` (a promise), with a deadline: on a black-holed network a
    request never fails by itself. The options are a JS object built here: PyScript's
    `fetch` sends its keyword arguments through JSON under MicroPython, which cannot carry
    an AbortSignal."""
    init = js.Object.new()
    init.method = method
    init.credentials = "same-origin"
    init.cache = "no-store"
    if body is not None:
        headers = js.Headers.new()
        headers.set("Content-Type", "application/json")
        init.headers = headers
        init.body = body
    init.signal = signal if signal is not None else js.AbortSignal.timeout(int(timeout * 1000))
    return js.fetch(url, init)


def parse_json(status, text):
    """(status, the JSON body or None): an empty, truncated or non-JSON body is no body."""
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, None


async def fetch_json(url, timeout=HTTP_TIMEOUT):
    """(status, JSON body or None) of a GET; (None, None) if the network failed."""
    try:
        response = await http(url, timeout=timeout)
        text = str(await response.text())
    except Exception:  # a network failure rejects the promise: offline
        return None, None
    return parse_json(int(response.status), text)


async def get_json(url, timeout=HTTP_TIMEOUT):
    """The JSON body of a successful GET, or None (offline, or an error status)."""
    status, body = await fetch_json(url, timeout)
    return body if status == 200 else None


async def post_json(url, payload):
    """(status, JSON body or None) of a POST of `payload` (None: an empty body);
    (None, None) if the network failed."""
    try:
        body = json.dumps(payload) if payload is not None else ""
        response = await http(url, method="POST", body=body)
        text = str(await response.text())
    except Exception:
        return None, None
    return parse_json(int(response.status), text)
