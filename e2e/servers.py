"""Servers the e2e tests kill and bring back.

`start_server` (tests/harness.py) picks a free port; a server that comes back after a crash
must keep its port (the page's origin), its database and its secret (the page's identity
cookie), so `restart` starts `python -m backend` again with the exact environment of the
one that died.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx

from tests.harness import ROOT, TIMEOUT, Server


def restart(old: Server) -> Server:
    """Start a server like `old` (same port, database, secret, settings); wait until it
    answers. `old` must have exited."""
    if old.proc.poll() is None:
        raise RuntimeError("the old server is still running: stop it first")
    log_path = old.log_path.with_name(old.log_path.stem + "-restarted.log")
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend"], cwd=ROOT, env=old.env, stdout=out, stderr=out
        )
    server = Server(proc, old.port, old.env, log_path)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not start again:\n{server.log()}")
