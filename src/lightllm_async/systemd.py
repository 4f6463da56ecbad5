"""systemd integration: readiness, watchdog and stop notices (sd_notify), and the unit file.

The notify protocol is one datagram of `KEY=value` lines sent to the unix socket that systemd
names in $NOTIFY_SOCKET (a path, or an abstract name written with a leading '@'); outside systemd
the variable is unset and every notice is a no-op. The server sends READY=1 once the model is
loaded and HTTP listens, WATCHDOG=1 every WatchdogSec/2 while the engine's heartbeat moves, and
STOPPING=1 when a signal starts the drain. No libsystemd needed: these few lines are all of it.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import time
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger(__name__)


def notify(message: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send `message` (lines of KEY=value) to systemd; False when not under systemd or on error."""
    addr = env.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # an abstract socket
    elif not addr.startswith("/"):
        return False  # unset, or a kind this server does not speak (vsock)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
    except OSError as e:
        log.warning("systemd notify %r failed: %s", message.split("\n", 1)[0], e)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec), or None when systemd asked for none
    or asked another process ($WATCHDOG_PID)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0"))
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 2e6


class Watchdog:
    """Pings systemd's watchdog every `interval` seconds while `heartbeat()` keeps changing.

    `tick()` is called often (the server calls it every 0.1 s on its event loop, so a wedged
    event loop stops the pings too). A heartbeat that has not changed for `stale_after` seconds
    means a wedged engine: the pings stop, and systemd restarts the service after WatchdogSec.
    With several engine replicas `heartbeat()` returns each one's count, and every one must move:
    the replica whose count moved longest ago decides.
    """

    def __init__(
        self,
        interval: float,
        heartbeat: Callable[[], int | Sequence[int]],
        stale_after: float,
        send: Callable[[str], object] = notify,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.interval = interval
        self.stale_after = stale_after
        self._heartbeat, self._send, self._clock = heartbeat, send, clock
        self._beats = self._read()
        self._pinged = clock()
        self._moved = [self._pinged] * len(self._beats)  # when each count last changed
        self._pinged -= interval  # the first tick pings
        self.stalled = False

    def _read(self) -> tuple[int, ...]:
        beat = self._heartbeat()
        return (beat,) if isinstance(beat, int) else tuple(beat)

    def tick(self) -> bool:
        """Ping if it is time and every engine is alive; True when it pinged."""
        now, beats = self._clock(), self._read()
        for k, (old, new) in enumerate(zip(self._beats, beats, strict=True)):
            if new != old:
                self._moved[k] = now
        self._beats = beats
        oldest = min(range(len(beats)), key=self._moved.__getitem__)
        if now - self._moved[oldest] > self.stale_after:
            if not self.stalled:
                which = "the engine's" if len(beats) == 1 else f"engine replica {oldest}'s"
                log.error(
                    "%s heartbeat has not moved for %.1f s: no more watchdog pings",
                    which,
                    now - self._moved[oldest],
                )
                self.stalled = True
            return False
        if self.stalled:
            log.warning("the engine heartbeats move again: watchdog pings resume")
            self.stalled = False
        if now - self._pinged < self.interval:
            return False
        self._send("WATCHDOG=1")
        self._pinged = now
        return True


UNIT = """\
# {name}.service, from `lightllm-async systemd-unit{args}`
[Unit]
Description=lightllm-async LLM server
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
# Only the server process speaks to systemd (its engine processes do not).
NotifyAccess=main
ExecStart={exec_start}
# Secrets stay off the command line: LLA_API_KEY=... in this file (mode 0600).
EnvironmentFile=-/etc/lightllm-async/env
Restart=on-failure
RestartSec=2
# READY=1 comes once the weights are loaded and the engine is warm.
TimeoutStartSec={start_timeout}
# SIGTERM to the server, which drains for --shutdown-timeout and stops its engine; then SIGKILL
# to whatever is left in the unit.
KillMode=mixed
TimeoutStopSec={stop_timeout}
# WATCHDOG=1 every WatchdogSec/2 while the engine's heartbeat moves; a wedged engine is restarted.
WatchdogSec={watchdog}

[Install]
WantedBy=multi-user.target
"""


def unit_text(
    exec_start: Sequence[str],
    args: Sequence[str],
    shutdown_timeout: float,
    watchdog_sec: int,
    start_timeout: int = 900,
    name: str = "lightllm-async",
) -> str:
    """The unit file for `exec_start` (the command and its flags, secrets already left out)."""
    return UNIT.format(
        name=name,
        args="".join(" " + shlex.quote(a) for a in args),
        exec_start=_systemd_escape(shlex.join(exec_start)),
        start_timeout=start_timeout,
        stop_timeout=int(shutdown_timeout) + 15,
        watchdog=watchdog_sec,
    )


def _systemd_escape(command: str) -> str:
    # systemd expands %specifiers and $VARIABLES in ExecStart; a flag's value means itself.
    return command.replace("%", "%%").replace("$", "$$")
