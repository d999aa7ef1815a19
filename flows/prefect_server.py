"""A Prefect API server for one CLI command, when no server is configured.

Prefect's own ephemeral server shares the terminal's process group, so a Ctrl-C kills it before the
flow run's final state is written, and a SIGTERM leaves it orphaned. The CLI instead runs
`prefect server start` (API only) in a session of its own, records the interrupted run as Cancelled
through it, and stops it on the way out, however the command ends.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.core.ports import free_port

log = logging.getLogger("tunefactory")
STARTUP_SECONDS = 120  # a busy 2-core machine can take a while to start it
# Runs before the server's own code: on Linux, asks the kernel to send the server SIGTERM when the command that
# started it dies (prctl PR_SET_PDEATHSIG, which survives the exec), then becomes `prefect server start`. A
# command killed outright (SIGKILL, the OOM killer) cannot stop its server itself, and the server's own
# session keeps a Ctrl-C from reaching it, so without this it would outlive the command for good.
EXEC_WITH_PARENT_DEATH_SIGNAL = """
import ctypes, os, signal, sys
parent, command = int(sys.argv[1]), sys.argv[2:]
if sys.platform == "linux":
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:  # the command died before the signal was armed
    sys.exit(1)
os.execv(command[0], command)
"""


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class BackgroundServer:
    """`prefect server start` booting in its own session while the CLI goes on; `connected()` waits for it."""

    def __init__(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        prefect = Path(sys.executable).with_name("prefect")
        self.command = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui",
                        "--no-services", "--analytics-off"]
        launch = [sys.executable, "-c", EXEC_WITH_PARENT_DEATH_SIGNAL, str(os.getpid()), *self.command]
        self.process = subprocess.Popen(launch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)

    @contextmanager
    def connected(self) -> Iterator[str]:
        """Wait until the server answers, then point Prefect at it for the block."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        deadline = time.monotonic() + STARTUP_SECONDS
        while not healthy(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start ({' '.join(self.command)})")
            time.sleep(0.1)
        log.info("Prefect server for this run: %s (pid %d)", self.url, self.process.pid)
        with temporary_settings(updates={PREFECT_API_URL: self.url}):
            yield self.url

    def stop(self) -> None:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # send the run's queued log lines while the server is still there
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ConfiguredServer:
    """The server PREFECT_API_URL names: nothing to start or stop."""

    @contextmanager
    def connected(self) -> Iterator[None]:
        yield None

    def stop(self) -> None:
        pass


@contextmanager
def background_server() -> Iterator[BackgroundServer | ConfiguredServer]:
    """Start a server for this command now (unless one is configured), so it boots while the recipe is read and
    planned; stopped on the way out, however the command ends."""
    from prefect.settings import PREFECT_API_URL

    server = ConfiguredServer() if PREFECT_API_URL.value() else BackgroundServer()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def temporary_server() -> Iterator[str | None]:
    """Yield the API URL of a server started for this command, or None if one is configured already."""
    with background_server() as server, server.connected() as url:
        yield url
