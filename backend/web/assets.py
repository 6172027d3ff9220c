"""The browser client's files: the app itself, PyScript and its interpreters from npm.

No page load leaves the server's origin: PyScript, MicroPython and Pyodide are the exact
versions pinned in frontend/package-lock.json, served under /vendor/. They are large
(Pyodide is ~14 MB), so each is gzipped once, in a worker thread, and the compressed copy
is kept in memory; responses carry a week of `Cache-Control` and an `ETag`, so a
returning visitor does not download an interpreter again. The PyScript configuration,
which lists every client module, is generated from the files on disk.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from litestar import MediaType, Request, Response, get
from litestar.datastructures import State

from backend.protocol import NOT_FOUND, ProtocolError, error_frame

FRONTEND: Final = Path(__file__).resolve().parents[2] / "frontend"
NODE_MODULES: Final = FRONTEND / "node_modules"
VENDOR_ROOTS: Final = {
    "pyscript": NODE_MODULES / "@pyscript" / "core" / "dist",
    "micropython": NODE_MODULES / "@micropython" / "micropython-webassembly-pyscript",
    "pyodide": NODE_MODULES / "pyodide",
}
INTERPRETERS: Final = {
    "micropython": "/vendor/micropython/micropython.mjs",
    "pyodide": "/vendor/pyodide/pyodide.mjs",
}
VENDOR_MAX_AGE: Final = 7 * 24 * 3600
_COMPRESSIBLE: Final = (".js", ".mjs", ".wasm", ".json", ".css", ".html", ".map", ".ts")

mimetypes.add_type("text/javascript", ".mjs")
mimetypes.add_type("application/wasm", ".wasm")


@dataclass(frozen=True)
class _Compressed:
    body: bytes
    etag: str


class VendorFiles:
    """Resolves /vendor/<package>/<path> safely and keeps gzipped copies."""

    def __init__(self) -> None:
        self._gz: dict[Path, _Compressed] = {}
        self._locks: dict[Path, asyncio.Lock] = {}

    def resolve(self, package: str, path: str) -> Path:
        root = VENDOR_ROOTS.get(package)
        if root is None:
            raise ProtocolError(error_frame(NOT_FOUND, "no such file"))
        target = (root / path).resolve()
        if not target.is_relative_to(root.resolve()) or not target.is_file():
            raise ProtocolError(error_frame(NOT_FOUND, "no such file"))
        return target

    async def gzipped(self, path: Path) -> _Compressed:
        found = self._gz.get(path)
        if found is not None:
            return found
        lock = self._locks.setdefault(path, asyncio.Lock())
        async with lock:
            found = self._gz.get(path)
            if found is None:
                found = await asyncio.to_thread(_compress, path)
                self._gz[path] = found
        return found


def _compress(path: Path) -> _Compressed:
    data = path.read_bytes()
    return _Compressed(
        body=gzip.compress(data, compresslevel=6, mtime=0),
        etag='"' + hashlib.sha256(data).hexdigest()[:32] + '-gz"',
    )


@get("/vendor/{package:str}/{path:path}")
async def vendor_file(
    request: Request[Any, Any, Any], state: State, package: str, path: str
) -> Response[bytes]:
    files: VendorFiles = state.vendor_files
    target = files.resolve(package, path.lstrip("/"))
    media_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    headers = {"Cache-Control": f"public, max-age={VENDOR_MAX_AGE}", "Vary": "Accept-Encoding"}
    accepts_gzip = "gzip" in request.headers.get("accept-encoding", "")
    if accepts_gzip and target.suffix in _COMPRESSIBLE:
        compressed = await files.gzipped(target)
        headers["ETag"] = compressed.etag
        if request.headers.get("if-none-match") == compressed.etag:
            return Response(b"", status_code=304, headers=headers)
        headers["Content-Encoding"] = "gzip"
        return Response(compressed.body, media_type=media_type, headers=headers)
    data = await asyncio.to_thread(target.read_bytes)
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    headers["ETag"] = etag
    if request.headers.get("if-none-match") == etag:
        return Response(b"", status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


def pyscript_config(runtime: str) -> dict[str, Any]:
    """PyScript's config for `runtime`: the interpreter, and every client module mapped
    into the interpreter's file system so that `import tokenwire...` works."""
    files = {
        f"/{p.relative_to(FRONTEND).as_posix()}": f"./{p.relative_to(FRONTEND).as_posix()}"
        for p in sorted((FRONTEND / "tokenwire").rglob("*.py"))
    }
    return {"interpreter": INTERPRETERS[runtime], "files": files}


@get(
    [f"/pyscript/{runtime}.json" for runtime in INTERPRETERS],
    media_type=MediaType.JSON,
    sync_to_thread=False,
)
def pyscript_config_route(request: Request[Any, Any, Any]) -> Response[bytes]:
    runtime = request.url.path.rsplit("/", 1)[1].removesuffix(".json")
    return Response(
        json.dumps(pyscript_config(runtime)).encode(),
        media_type=MediaType.JSON,
        headers={"Cache-Control": "no-cache"},
    )
