"""systemd service notifications (sd_notify), without a dependency: one datagram per message.

With `Type=notify` systemd waits for READY=1 before it considers the service started, shows
STATUS= in `systemctl status`, and with `WatchdogSec=` restarts the service when WATCHDOG=1
pings stop, which replicad sends only while its sync loops are alive.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send `message` to systemd if it asked for notifications; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half systemd's timeout), or None if no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
