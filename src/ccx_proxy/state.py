"""What a running gateway holds: settings, access keys, the upstream client, live
health and affinity, and the current configuration snapshot (swapped whole on
reload)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .affinity import SessionAffinity
from .auth import AccessKeys
from .catalog import ModelCatalog
from .config import GatewayConfig
from .health import Clock, HealthRegistry
from .routing import Router
from .settings import Settings
from .shared.affinity import SharedAffinity
from .shared.client import SharedStore
from .shared.health import HealthSync
from .shared.limits import SharedLimiter
from .team.service import Team
from .upstream.client import UpstreamClient


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
    __slots__ = (
        "settings",
        "access_keys",
        "runtime",
        "health",
        "affinity",
        "streams",
        "adjust",
        "team",
        "shared",
        "_client",
    )

    def __init__(self, settings: Settings, config: GatewayConfig, clock: Clock | None = None) -> None:
        self.settings = settings
        self.access_keys = AccessKeys(settings.access_keys)
        self.team = Team(
            self.access_keys,
            settings.data_dir,
            allow_shared=settings.allow_shared_key,
            record_usage=settings.usage_recording and settings.data_dir is not None,
            retention_days=settings.usage_retention_days,
            database_url=settings.database_url,
        )
        # REDIS_URL: limits, upstream health, affinity and live numbers shared by every
        # worker and host (ccx_proxy.shared); None: this process keeps its own.
        self.shared = SharedStore(settings.redis) if settings.redis is not None else None
        if self.shared is not None:
            self.team.shared_limits = SharedLimiter(self.shared, self.team.limiter, self.team.budget_totals)
        self.health = HealthRegistry(clock) if clock is not None else HealthRegistry()
        self.runtime = Runtime.build(config)
        if self.shared is not None:
            HealthSync(self.shared, self.health, lambda: self.runtime.config.channels)
        self.affinity = self._affinity(config)
        self._client: UpstreamClient | None = None
        self.streams = 0  # requests being relayed now (maxConcurrentStreams)
        # Applied to every configuration loaded later (reloads, admin writes): what the
        # command line changed in memory (serve --mock-port) stays changed.
        self.adjust: Callable[[GatewayConfig], GatewayConfig] | None = None

    def apply(self, config: GatewayConfig) -> None:
        """Switch to a new configuration; in-flight requests keep their snapshot."""
        if self.adjust is not None:
            config = self.adjust(config)
        self.runtime = Runtime.build(config)
        self.health.reloaded({c.name for c in config.channels})
        if self.health.sync is not None:
            self.health.sync.reloaded()
        if config.affinity != self.affinity.policy:
            self.affinity = self._affinity(config)

    def _affinity(self, config: GatewayConfig) -> SessionAffinity:
        if self.shared is not None:
            return SharedAffinity(config.affinity, self.shared)
        return SessionAffinity(config.affinity)

    @property
    def client(self) -> UpstreamClient:
        """The one upstream client (:mod:`ccx_proxy.upstream.client`): relay and admin probe."""
        assert self._client is not None, "the upstream client is opened at app startup"
        return self._client

    def open_client(self, client: UpstreamClient) -> None:
        self._client = client


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
