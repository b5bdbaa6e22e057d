"""Hot reload: a changed channels file (polled) or SIGHUP swaps in a new
configuration.  An invalid file is rejected with a log line and the running
configuration stays.  In-flight requests finish on the snapshot they started
with; new requests use the new one.  With ``REDIS_URL``, a file loaded here that
differs from the fleet's version is then published to every instance
(:mod:`ccx_proxy.shared.config`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, load_config
from .state import Gateway

log = logging.getLogger("ccx_proxy.reload")

Stamp = tuple[int, int, int] | None


def _stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ConfigWatcher:
    def __init__(self, gateway: Gateway, path: str | os.PathLike[str], interval: float) -> None:
        self.gateway = gateway
        self.path = Path(path)
        self.interval = interval
        self._seen = _stamp(self.path)
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0
        self.rejected = 0  # invalid files seen (and kept out)
        # With REDIS_URL (ccx_proxy.shared.config): called with the reason after a file was
        # loaded, to offer it to the fleet when it differs from the fleet's version.
        self.on_reload: Callable[[str], None] | None = None

    def reload(self, reason: str) -> bool:
        """Load the file now; True when the new configuration is in use."""
        self._seen = _stamp(self.path)
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload (%s) rejected: %s", reason, problem)
            log.error("keeping the running configuration")
            self.rejected += 1
            return False
        for warning in config.warnings:
            log.warning("%s: %s", self.path, warning)
        self.gateway.apply(config)
        self.reloads += 1
        log.info(
            "reloaded %s (%s): %d active of %d channels",
            self.path,
            reason,
            len(config.active),
            len(config.channels),
        )
        if self.on_reload is not None:
            self.on_reload(reason)
        return True

    def written(self) -> None:
        """The gateway wrote the file itself and applied it already."""
        self._seen = _stamp(self.path)

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            stamp = _stamp(self.path)
            if stamp is not None and stamp != self._seen:
                # Let a writer that is not atomic finish before reading.
                await asyncio.sleep(min(self.interval, 0.1))
                self.reload("file changed")
