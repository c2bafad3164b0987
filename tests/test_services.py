"""The composition root, in process: what a started server leaves behind."""

from __future__ import annotations

import asyncio
import gc

from flywheel.config import Settings
from flywheel.server.services import Services


def test_started_services_freeze_the_long_lived_heap(tmp_path) -> None:
    # Full collections over torch's and the models' objects stalled every request ~100 ms.
    (tmp_path / "flywheel.yaml").write_text(
        "providers:\n  up: {type: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
        "models:\n  - {name: up-echo, provider: up}\n"
    )
    settings = Settings(
        home=tmp_path, config_file=tmp_path / "flywheel.yaml", admin_key="fw-services-test"
    )
    gc.unfreeze()
    assert gc.get_freeze_count() == 0

    async def start_and_close() -> int:
        services = Services.build(settings)
        services.start_background()
        if services._preload is not None:
            await services._preload
        frozen = gc.get_freeze_count()
        await services.close()
        return frozen

    try:
        assert asyncio.run(start_and_close()) > 10_000
    finally:
        gc.unfreeze()


def test_provider_key_comes_from_the_secret_store(tmp_path) -> None:
    from flywheel.providers.openai_compat import OpenAICompatibleProvider
    from flywheel.security.secrets import SecretBox, SecretStore, load_master_key
    from flywheel.store import Database

    value = "sk-stored-provider-key-0123456789"
    (tmp_path / "flywheel.yaml").write_text(
        "providers:\n"
        "  up: {type: openai, base_url: 'http://127.0.0.1:9/v1', api_key_secret: up-key}\n"
        "models:\n  - {name: up-echo, provider: up}\n"
    )
    settings = Settings(
        home=tmp_path, config_file=tmp_path / "flywheel.yaml", admin_key="fw-services-test"
    )
    db = Database(settings.resolved_database_url)
    db.migrate()
    store = SecretStore(db, SecretBox(load_master_key(tmp_path, None)))
    store.set("default", "up-key", value)
    db.dispose()

    async def provider_headers() -> dict[str, str]:
        services = Services.build(settings)
        provider = services.providers.providers["up"]
        assert isinstance(provider, OpenAICompatibleProvider)
        await services.close()
        return provider._headers

    assert asyncio.run(provider_headers())["Authorization"] == f"Bearer {value}"
    assert value.encode() not in (tmp_path / "flywheel.db").read_bytes()


def test_a_job_worker_runs_the_stored_config_and_never_reapplies_the_file(tmp_path) -> None:
    """A config change made through the API after start (here: one more catalog model) must
    survive a job worker starting up; only a server start applies the file."""
    from flywheel.config import FlywheelConfig, load_config
    from flywheel.config.revisions import ConfigRevisions
    from flywheel.store import Database

    (tmp_path / "flywheel.yaml").write_text(
        "providers:\n  up: {type: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
        "models:\n  - {name: up-echo, provider: up}\n"
    )
    settings = Settings(
        home=tmp_path, config_file=tmp_path / "flywheel.yaml", admin_key="fw-services-test"
    )

    async def build_and_close(worker: bool) -> tuple[int, list[str]]:
        services = Services.build(settings, worker=worker)
        found = services.config_revision, [m.name for m in services.config.models]
        await services.close()
        return found

    first, _ = asyncio.run(build_and_close(worker=False))
    db = Database(settings.resolved_database_url)
    changed = load_config(tmp_path / "flywheel.yaml").model_dump()
    changed["models"].append({"name": "up-echo-2", "provider": "up"})
    applied, created = ConfigRevisions(db).save(
        FlywheelConfig.model_validate(changed), "api", "key:test"
    )
    assert created and applied == first + 1

    revision, models = asyncio.run(build_and_close(worker=True))
    assert revision == applied and "up-echo-2" in models
    assert ConfigRevisions(db).latest_number() == applied  # nothing re-applied

    revision, models = asyncio.run(build_and_close(worker=False))
    assert revision == applied + 1 and "up-echo-2" not in models  # a server start: the file
    db.dispose()
