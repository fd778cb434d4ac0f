"""The app in a real server: ``streamlit run app.py`` in a subprocess on a free local port, for a headless
browser to open (the browser test, ``scripts/screenshot_duel.py``). Playwright is the caller's business; nothing
here imports it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
"""Debian's Chromium, the browser the callers drive."""
CHROME_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


class AppDidNotStart(RuntimeError):
    """The server exited, or did not answer its health check in time; the message names its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_env(root: Path, overrides: dict[str, str | None] | None = None) -> dict[str, str]:
    """The server's environment: this one with the hub offline, no usage statistics, ``root/src`` first on
    ``PYTHONPATH`` (so that it runs this checkout's code, not whatever saesteer is installed), then
    ``overrides`` (a None value removes the variable)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@contextmanager
def running_app(root: Path, env: dict[str, str], log_path: Path, timeout: float) -> Iterator[str]:
    """Start ``root/app.py`` with its output in ``log_path``, wait up to ``timeout`` seconds until it answers,
    yield its base URL (``http://127.0.0.1:PORT``) and stop it on exit. Raises :class:`AppDidNotStart`."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + timeout
            while not _healthy(base):
                if proc.poll() is not None or time.time() > deadline:
                    raise AppDidNotStart(f"streamlit did not start; see {log_path}")
                time.sleep(0.5)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _healthy(base: str) -> bool:
    try:
        return urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read().strip() == b"ok"
    except OSError:
        return False
