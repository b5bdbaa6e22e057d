"""Hot reload: a changed channels file (polled) or SIGHUP swaps in a new
configuration.  An invalid file is rejected with a log line and the running
configuration stays.  In-flight requests finish on the snapshot they started
with; new requests use the new one.  With ``REDIS_URL``, a file loaded here that
differs from the fleet's version is then published to every instance
(:mod:`ccx_proxy.shared.config`): the bytes that were validated, read once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import orjson

from .config import ConfigError, GatewayConfig, parse_config
from .state import Gateway
from .store import version_of
from .tasks import cancel_and_wait

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
        # The version the gateway wrote to this file itself and applies (until a file is loaded
        # here): a poll that finds the file at this version does not load it a second time.
        self._written: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0
        self.rejected = 0  # invalid files seen (and kept out)
        # With REDIS_URL (ccx_proxy.shared.config): called with the reason and the bytes that
        # were loaded, to offer them to the fleet when they differ from the fleet's version.
        self.on_reload: Callable[[str, bytes], None] | None = None

    def reload(self, reason: str) -> bool:
        """Load the file now; True when the new configuration is in use."""
        self._seen = _stamp(self.path)
        try:
            raw = self._read()
        except ConfigError as exc:
            return self._reject(reason, exc)
        return self._load(reason, raw)

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise ConfigError([f"{self.path}: file not found (set --config or CHANNELS_FILE)"]) from None
        except OSError as exc:
            raise ConfigError([f"{self.path}: cannot read: {exc.strerror}"]) from None

    def _parse(self, raw: bytes) -> GatewayConfig:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ConfigError([f"{self.path}: not valid JSON: {exc}"]) from None
        return parse_config(data, os.environ, source=str(self.path))

    def _reject(self, reason: str, exc: ConfigError) -> bool:
        for problem in exc.problems:
            log.error("reload (%s) rejected: %s", reason, problem)
        log.error("keeping the running configuration")
        self.rejected += 1
        return False

    def _load(self, reason: str, raw: bytes) -> bool:
        """Parse ``raw`` (the file's bytes, read once) and apply it."""
        try:
            config = self._parse(raw)
        except ConfigError as exc:
            return self._reject(reason, exc)
        for warning in config.warnings:
            log.warning("%s: %s", self.path, warning)
        self.gateway.apply(config)
        self._written = None
        self.reloads += 1
        log.info(
            "reloaded %s (%s): %d active of %d channels",
            self.path,
            reason,
            len(config.active),
            len(config.channels),
        )
        if self.on_reload is not None:
            self.on_reload(reason, raw)
        return True

    def expect(self, version: str | None) -> None:
        """The gateway is writing ``version`` to the file and applies it itself (None: that write
        failed).  Called by the store under its locks, before the file is replaced, so a poll
        in between does not load the same version a second time."""
        self._written = version

    def written(self, version: str | None = None) -> None:
        """The gateway wrote the file itself (``version``; None: whatever it holds now) and
        applied it already."""
        self._seen = _stamp(self.path)
        if version is None:
            with contextlib.suppress(OSError):
                version = version_of(self.path.read_bytes())
        self._written = version

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            stamp = _stamp(self.path)
            if stamp is not None and stamp != self._seen:
                # Let a writer that is not atomic finish before reading.
                await asyncio.sleep(min(self.interval, 0.1))
                self._seen = _stamp(self.path)
                try:
                    raw = self._read()
                except ConfigError as exc:
                    self._reject("file changed", exc)
                    continue
                if self._written is not None and version_of(raw) == self._written:
                    continue  # the gateway wrote this version itself (and applies it)
                self._load("file changed", raw)
