"""Local network helpers of the servers (``lavis-c2f demo``, ``lavis-c2f serve``)."""
from __future__ import annotations

import socket

from lavis_c2f.common.errors import ConfigError


def check_port(host: str, port: int) -> None:
    """Raise :class:`ConfigError` naming the option when ``port`` is out of range or
    ``host:port`` cannot be bound (in use, or an address of another machine); checked before
    the models load, so the mistake is one line instead of a late crash."""
    if not 1 <= int(port) <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, int(port)))
        except OSError as e:
            raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror or e} (choose another --port)") from None


__all__ = ["check_port"]
