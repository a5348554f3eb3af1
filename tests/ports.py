"""Free TCP ports on 127.0.0.1 for the process groups and servers tests start."""
import socket


def free_port() -> int:
    """A port free now (the OS picks it; nothing holds it after this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
