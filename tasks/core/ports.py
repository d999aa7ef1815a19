"""A free local TCP port, for the servers and launchers this project starts (Prefect, torchrun's rendezvous)."""

import socket


def free_port() -> int:
    """A port nothing listens on now (the OS picks it); the caller binds it soon after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
