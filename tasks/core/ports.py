"""A free local TCP port, for the servers and launchers this project starts (Prefect, torchrun's rendezvous)."""

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A port nothing listens on now, which the caller binds soon after (torchrun: seconds later, once its
    imports are done). It comes from below the kernel's ephemeral range where there is one: the kernel hands
    those ports to nobody by itself, whereas a port from bind(0) is ephemeral, and any process's outgoing
    connection may take it as its source port before the caller binds it (two test workers opening
    connections made that a real race). Elsewhere the OS picks one."""
    low = int(EPHEMERAL_RANGE.read_text().split()[0]) if EPHEMERAL_RANGE.is_file() else 0
    for port in random.sample(range(20000, low), min(100, max(0, low - 20000))):
        if binds(port):
            return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def binds(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
