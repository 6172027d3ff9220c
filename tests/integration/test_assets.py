"""The browser client's files: from the server's own origin, compressed, cacheable."""

from __future__ import annotations

import httpx

from backend.web.assets import FRONTEND, VENDOR_ROOTS
from harness.server import Server


def test_pyscript_config_lists_every_client_module(server: Server) -> None:
    for runtime, interpreter in [
        ("micropython", "/vendor/micropython/micropython.mjs"),
        ("pyodide", "/vendor/pyodide/pyodide.mjs"),
    ]:
        config = httpx.get(f"{server.url}/pyscript/{runtime}.json").json()
        assert config["interpreter"] == interpreter
        expected = {
            f"/{p.relative_to(FRONTEND).as_posix()}" for p in (FRONTEND / "tokenwire").rglob("*.py")
        }
        assert set(config["files"]) == expected
        assert "/tokenwire/core/session.py" in expected
        for url in config["files"]:  # each one is served
            assert httpx.get(server.url + url).status_code == 200


def test_interpreters_are_served_gzipped_and_cacheable(server: Server) -> None:
    for path in ["/vendor/micropython/micropython.wasm", "/vendor/pyscript/core.js"]:
        response = httpx.get(server.url + path, headers={"Accept-Encoding": "gzip"})
        assert response.status_code == 200
        assert response.headers["content-encoding"] == "gzip"
        assert "max-age=604800" in response.headers["cache-control"]
        package, _, rest = path.removeprefix("/vendor/").partition("/")
        assert response.content == (VENDOR_ROOTS[package] / rest).read_bytes()  # decoded
        # A returning visitor revalidates without downloading it again.
        again = httpx.get(
            server.url + path,
            headers={"Accept-Encoding": "gzip", "If-None-Match": response.headers["etag"]},
        )
        assert again.status_code == 304
        assert again.content == b""


def test_wasm_and_modules_have_the_right_types(server: Server) -> None:
    wasm = httpx.get(f"{server.url}/vendor/micropython/micropython.wasm")
    assert wasm.headers["content-type"] == "application/wasm"
    module = httpx.get(f"{server.url}/vendor/micropython/micropython.mjs")
    assert module.headers["content-type"].startswith("text/javascript")
    raw = httpx.get(
        f"{server.url}/vendor/pyodide/pyodide.asm.wasm", headers={"Accept-Encoding": "identity"}
    )
    assert "content-encoding" not in raw.headers
    assert raw.content[:4] == b"\0asm"


def test_vendor_paths_cannot_escape(server: Server) -> None:
    for path in [
        "/vendor/pyscript/../../../../pyproject.toml",
        "/vendor/pyscript/%2e%2e/%2e%2e/package.json",
        "/vendor/nope/core.js",
        "/vendor/pyscript/missing.js",
    ]:
        response = httpx.get(server.url + path)
        assert response.status_code in (400, 404), path
        assert b"[project]" not in response.content


def test_the_page_and_app_files_are_compressed_and_revalidated(server: Server) -> None:
    page = httpx.get(server.url + "/", headers={"Accept-Encoding": "gzip"})
    assert page.status_code == 200
    assert "no-cache" in page.headers["cache-control"]
    assert 'type="module" src="/vendor/pyscript/core.js"' in page.text
    assert "tw_id=" in page.headers["set-cookie"]
    module = httpx.get(
        server.url + "/tokenwire/browser/app.py", headers={"Accept-Encoding": "gzip"}
    )
    assert module.headers.get("content-encoding") == "gzip"
    assert module.text == (FRONTEND / "tokenwire" / "browser" / "app.py").read_text()
