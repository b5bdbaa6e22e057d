"""What a running gateway holds: settings, access keys, the client session, and
the current configuration snapshot (swapped whole on reload)."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .auth import AccessKeys
from .catalog import ModelCatalog
from .config import GatewayConfig
from .routing import Router
from .settings import Settings
from .upstream import Timeouts


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything derived from one configuration; requests keep the one they started with."""

    config: GatewayConfig
    router: Router
    catalog: ModelCatalog

    @classmethod
    def build(cls, config: GatewayConfig) -> Runtime:
        return cls(config=config, router=Router(config), catalog=ModelCatalog(config))


class Gateway:
    __slots__ = ("settings", "access_keys", "runtime", "timeouts", "_session")

    def __init__(self, settings: Settings, config: GatewayConfig, timeouts: Timeouts) -> None:
        self.settings = settings
        self.access_keys = AccessKeys(settings.access_keys)
        self.runtime = Runtime.build(config)
        self.timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the client session is opened at app startup"
        return self._session

    def open_session(self, session: aiohttp.ClientSession) -> None:
        self._session = session


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
