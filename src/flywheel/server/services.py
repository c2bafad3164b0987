"""The composition root: builds every service of a running server from the settings."""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.config import FlywheelConfig, Settings, load_config
from flywheel.gateway import Gateway
from flywheel.providers import ProviderRegistry
from flywheel.security import ApiKeyStore
from flywheel.store import Database
from flywheel.tracing import TraceQueries, TraceWriter

log = logging.getLogger("flywheel.server")


def session_secret(home: Path) -> str:
    """The secret that signs UI session cookies, created once per home (mode 0600)."""
    path = home / "session.secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(48))
    return path.read_text().strip()


def _settle_heap() -> None:
    """Move everything alive now (modules, torch, loaded models) out of the garbage
    collector's reach. Otherwise each full collection walks those ~300k long-lived objects
    and stalls every in-flight request for about 100 ms (seen as the gateway's p99)."""
    gc.collect()
    gc.freeze()


@dataclass
class Services:
    """Everything the routers call into; one instance per server process."""

    settings: Settings
    config: FlywheelConfig
    db: Database
    keys: ApiKeyStore
    writer: TraceWriter
    traces: TraceQueries
    providers: ProviderRegistry
    gateway: Gateway
    secret: str
    new_admin_key: str | None = None
    _preload: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        """Open the database (migrating it), make sure an admin key exists, load the config."""
        home = settings.home_dir
        home.mkdir(parents=True, exist_ok=True)
        config = load_config(settings.resolved_config_file)
        db = Database(settings.resolved_database_url)
        db.migrate()
        keys = ApiKeyStore(db)
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        new_admin_key = keys.ensure_admin(admin_key)
        writer = TraceWriter(db, settings.trace_batch_size, settings.trace_flush_seconds)
        providers = ProviderRegistry(
            config,
            settings.resolved_model_cache,
            settings.local_dtype,
            settings.local_max_batch_size,
            settings.local_threads,
        )
        return cls(
            settings=settings,
            config=config,
            db=db,
            keys=keys,
            writer=writer,
            traces=TraceQueries(db),
            providers=providers,
            gateway=Gateway(config, providers, writer, settings.capture),
            secret=session_secret(home),
            new_admin_key=new_admin_key,
        )

    def start_background(self) -> None:
        _settle_heap()
        if self.settings.preload_models:
            self._preload = asyncio.create_task(self._preload_models())

    async def _preload_models(self) -> None:
        await self.providers.preload()
        _settle_heap()

    async def close(self) -> None:
        """Stop accepting model work, then flush every trace to the database."""
        if self._preload is not None and not self._preload.done():
            self._preload.cancel()
        await self.providers.aclose()
        self.writer.close()
        self.db.dispose()
