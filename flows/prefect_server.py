"""A Prefect API server for one CLI command, when no server is configured.

Prefect's own ephemeral server shares the terminal's process group, so a Ctrl-C kills it before the
flow run's final state is written, and a SIGTERM leaves it orphaned. The CLI instead runs
`prefect server start` (API only) in a session of its own, records the interrupted run as Cancelled
through it, and stops it on the way out, however the command ends.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("tunefactory")
STARTUP_SECONDS = 120  # a busy 2-core machine can take a while to start it


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def temporary_server() -> Iterator[str | None]:
    """Yield the API URL of a server started for this command, or None if one is configured already."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui",
               "--no-services", "--analytics-off"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start ({' '.join(command)})")
            time.sleep(0.2)
        log.info("Prefect server for this run: %s (pid %d)", url, server.pid)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # send the run's queued log lines while the server is still there
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
