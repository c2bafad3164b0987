"""The model registry on a real database, audit log, artifact store and approval workflow.

Weights are small folders of fake files: the registry copies, sizes and points at them but
never loads them.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from flywheel.config.schema import FlywheelConfig
from flywheel.datasets.store import DatasetStore
from flywheel.registry import (
    ModelRegistry,
    RegistryError,
    lineage,
    model_card,
    parse_model_ref,
    served_name,
    serving_patch,
)
from flywheel.security.approvals import ApprovalError, ApprovalService
from flywheel.security.audit import AuditLog
from flywheel.security.rbac import Principal
from flywheel.store import (
    DEFAULT_PROJECT_ID,
    AuditEvent,
    Database,
    EvalRun,
    Job,
    ModelVersion,
    Project,
    Run,
)
from flywheel.store.artifacts import ArtifactStore
from tests.conftest import new_database_url


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    database = Database(new_database_url(tmp_path_factory.mktemp("registry")))
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def audit(db: Database) -> AuditLog:
    return AuditLog(db)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    return ArtifactStore(str(tmp_path_factory.mktemp("artifacts")))


@pytest.fixture(scope="module")
def registry(
    db: Database,
    audit: AuditLog,
    artifacts: ArtifactStore,
    tmp_path_factory: pytest.TempPathFactory,
) -> ModelRegistry:
    return ModelRegistry(db, audit, artifacts, tmp_path_factory.mktemp("cache"))


def _new_project(db: Database) -> str:
    project_id = f"p{secrets.token_hex(4)}"
    with db.session() as session:
        session.add(Project(id=project_id, name=project_id, created_at=time.time()))
    return project_id


@pytest.fixture
def project(db: Database) -> str:
    return _new_project(db)


def _weights(root: Path, name: str = "w", *, size: int = 1000, kind: str = "full") -> Path:
    """A fake model folder: an HF folder, a PEFT adapter or a lone GGUF file."""
    folder = root / f"{name}-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    if kind == "adapter":
        (folder / "adapter_config.json").write_text('{"r": 8}')
        (folder / "adapter_model.safetensors").write_bytes(b"\1" * size)
    elif kind == "gguf":
        (folder / "model.Q4_1.gguf").write_bytes(b"\2" * size)
    else:
        (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        (folder / "model.safetensors").write_bytes(b"\0" * size)
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    return folder


def _principal(project_id: str, name: str) -> Principal:
    return Principal(
        kind="key",
        id=f"id-{name}",
        name=name,
        project_id=project_id,
        role="admin",
        permissions=frozenset(),
        key_id=f"id-{name}",
    )


def _audit_actions(db: Database, project_id: str) -> list[str]:
    with db.session() as session:
        return list(
            session.scalars(
                select(AuditEvent.action)
                .where(AuditEvent.project_id == project_id)
                .order_by(AuditEvent.seq)
            )
        )


# -- models ----------------------------------------------------------------------------------


def test_create_list_get_update_and_refusals(registry: ModelRegistry, project: str) -> None:
    created = registry.create_model(
        project, "support-bot", "key:dev", description="Answers tickets", license="apache-2.0"
    )
    assert created["name"] == "support-bot" and created["versions"] == []
    with pytest.raises(RegistryError) as dup:
        registry.create_model(project, "support-bot", "key:dev")
    assert (dup.value.status_code, dup.value.code) == (409, "conflict")
    for bad in ("", "-x", "a b", "x" * 81, "a/b"):
        with pytest.raises(RegistryError) as invalid:
            registry.create_model(project, bad, "key:dev")
        assert invalid.value.status_code == 400

    updated = registry.update_model(
        project, "support-bot", "key:dev", intended_use="Internal support answers."
    )
    assert updated["intended_use"] == "Internal support answers."
    assert updated["license"] == "apache-2.0"
    with pytest.raises(RegistryError) as unknown:
        registry.update_model(project, "support-bot", "key:dev", name="renamed")
    assert unknown.value.status_code == 400

    listed = registry.list_models(project)
    assert [(m["name"], m["version_count"], m["latest_version"]) for m in listed] == [
        ("support-bot", 0, None)
    ]
    with pytest.raises(RegistryError) as missing:
        registry.get_model(project, "nope")
    assert (missing.value.status_code, missing.value.code) == (404, "model_not_found")
    assert _audit_actions(registry.db, project) == ["model.create", "model.update"]


def test_register_copies_folder_numbers_versions_and_keys_are_unique(
    registry: ModelRegistry, artifacts: ArtifactStore, project: str, tmp_path: Path
) -> None:
    source = _weights(tmp_path, size=4096)
    first = registry.register_version(
        project,
        "tiny",
        kind="base",
        source=source,
        format="safetensors",
        actor="key:dev",
        params={"dtype": "float32"},
    )
    second = registry.register_version(
        project, "tiny", kind="base", source=source, format="safetensors", actor="key:dev"
    )
    assert (first["version"], second["version"]) == (1, 2)
    assert first["ref"] == "tiny@1" and first["params"] == {"dtype": "float32"}
    # Every file is copied: the size counts all of them, and the copy is its own folder.
    expected = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
    assert first["size_bytes"] == expected > 4096
    one, two = registry.local_path(project, "tiny@1"), registry.local_path(project, "tiny@2")
    assert one != two and one.is_dir() and not one.is_relative_to(source)
    assert (one / "model.safetensors").read_bytes() == b"\0" * 4096
    assert (one / "tokenizer" / "tokenizer.json").is_file()
    # The source may change afterwards; the registered version does not.
    (source / "model.safetensors").write_bytes(b"changed")
    assert (one / "model.safetensors").stat().st_size == 4096

    model = registry.get_model(project, "tiny")
    assert [v["version"] for v in model["versions"]] == [2, 1]
    assert registry.version(project, "tiny", None)["version"] == 2
    assert registry.version(project, "tiny", "latest")["version"] == 2
    assert registry.resolve(project, "tiny@1")["id"] == first["id"]
    assert registry.list_models(project)[0]["version_count"] == 2
    assert "model.version.create" in _audit_actions(registry.db, project)

    with pytest.raises(RegistryError) as none:
        registry.register_version(
            project,
            "absent",
            kind="base",
            source=source,
            format="safetensors",
            actor="key:dev",
            create=False,
        )
    assert none.value.status_code == 404
    for bad in (
        {"kind": "lora"},
        {"format": "Not A Format"},
        {"source": tmp_path / "missing"},
        {"metrics": {"loss": float("nan")}},
    ):
        arguments: dict[str, Any] = {
            "kind": "base",
            "source": source,
            "format": "safetensors",
            "actor": "key:dev",
            **bad,
        }
        with pytest.raises(RegistryError) as refused:
            registry.register_version(project, "tiny", **arguments)
        assert refused.value.status_code == 400
    # A refused registration leaves no files behind and takes no version number.
    assert registry.version(project, "tiny", None)["version"] == 2
    stored = Path(artifacts.root) / "models" / project
    assert sum(1 for _ in stored.glob("*/*")) == 2


def test_concurrent_registrations_get_distinct_numbers(
    registry: ModelRegistry, artifacts: ArtifactStore, project: str, tmp_path: Path
) -> None:
    sources = [_weights(tmp_path) for _ in range(4)]

    def register(source: Path) -> int:
        return int(
            registry.register_version(
                project,
                "racy",
                kind="base",
                source=source,
                format="safetensors",
                actor="key:dev",
            )["version"]
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        numbers = sorted(pool.map(register, sources))
    assert numbers == [1, 2, 3, 4]
    keys = {registry.local_path(project, f"racy@{n}") for n in numbers}
    assert len(keys) == 4


def test_parents_adapters_and_refs(registry: ModelRegistry, project: str, tmp_path: Path) -> None:
    registry.register_version(
        project,
        "base",
        kind="base",
        source=_weights(tmp_path),
        format="safetensors",
        actor="key:dev",
    )
    registry.set_alias(project, "base", "staging", 1, "key:dev")
    with pytest.raises(RegistryError) as orphan:
        registry.register_version(
            project,
            "tuned",
            kind="adapter",
            source=_weights(tmp_path, kind="adapter"),
            format="peft",
            actor="key:dev",
        )
    assert orphan.value.status_code == 400 and orphan.value.param == "parent"
    for bad_parent, status in (("base@7", 404), ("base@prod", 404), ("ghost@1", 404)):
        with pytest.raises(RegistryError) as refused:
            registry.register_version(
                project,
                "tuned",
                kind="adapter",
                source=_weights(tmp_path, kind="adapter"),
                format="peft",
                actor="key:dev",
                parent=bad_parent,
            )
        assert refused.value.status_code == status and refused.value.param == "parent"
    adapter = registry.register_version(
        project,
        "tuned",
        kind="adapter",
        source=_weights(tmp_path, kind="adapter"),
        format="peft",
        actor="key:dev",
        parent="base@staging",
    )
    assert adapter["parent"] == "base@1" and adapter["version"] == 1
    merged = registry.register_version(
        project,
        "tuned",
        kind="merged",
        source=_weights(tmp_path),
        format="safetensors",
        actor="key:dev",
        parent="tuned@1",
    )
    assert merged["parent"] == "tuned@1"

    assert parse_model_ref("tuned") == ("tuned", None)
    assert parse_model_ref("tuned@3") == ("tuned", 3)
    assert parse_model_ref("tuned@production") == ("tuned", "production")
    for bad in ("@3", "tuned@0", "a b@1"):
        with pytest.raises(RegistryError):
            parse_model_ref(bad)
    # A model that others were made from keeps its lineage: it cannot be deleted first.
    with pytest.raises(RegistryError) as in_use:
        registry.delete_model(project, "base", "key:dev")
    assert (in_use.value.status_code, in_use.value.code) == (409, "in_use")


def test_aliases_move_resolve_remove_with_history(
    registry: ModelRegistry, project: str, tmp_path: Path
) -> None:
    for _ in range(3):
        registry.register_version(
            project,
            "m",
            kind="base",
            source=_weights(tmp_path),
            format="safetensors",
            actor="key:dev",
        )
    registry.set_alias(project, "m", "staging", 1, "key:dev")
    assert registry.resolve(project, "m@staging")["version"] == 1
    registry.set_alias(project, "m", "staging", 3, "key:ops")
    registry.set_alias(project, "m", "canary", 2, "key:ops")
    assert registry.resolve(project, "m@staging")["version"] == 3
    assert registry.get_model(project, "m")["aliases"] == {"canary": 2, "staging": 3}
    assert registry.version(project, "m", 3)["aliases"] == ["staging"]
    assert registry.list_models(project)[0]["aliases"] == {"canary": 2, "staging": 3}

    registry.remove_alias(project, "m", "canary", "key:ops")
    with pytest.raises(RegistryError) as gone:
        registry.resolve(project, "m@canary")
    assert (gone.value.status_code, gone.value.code) == (404, "alias_not_found")
    with pytest.raises(RegistryError):
        registry.remove_alias(project, "m", "canary", "key:ops")

    history = registry.alias_history(project, "m")
    assert [(e["alias"], e["from_version"], e["to_version"], e["actor"]) for e in history] == [
        ("canary", 2, None, "key:ops"),
        ("canary", None, 2, "key:ops"),
        ("staging", 1, 3, "key:ops"),
        ("staging", None, 1, "key:dev"),
    ]
    for bad in ("latest", "Prod", "1st", ""):
        with pytest.raises(RegistryError) as invalid:
            registry.set_alias(project, "m", bad, 1, "key:dev")
        assert invalid.value.status_code == 400
    with pytest.raises(RegistryError) as no_version:
        registry.set_alias(project, "m", "staging", 9, "key:dev")
    assert no_version.value.status_code == 404
    actions = _audit_actions(registry.db, project)
    assert actions.count("model.alias.move") == 3 and actions.count("model.alias.remove") == 1


def test_protected_alias_needs_an_approval_by_someone_else(
    db: Database, audit: AuditLog, registry: ModelRegistry, project: str, tmp_path: Path
) -> None:
    developer, reviewer = _principal(project, "dev"), _principal(project, "reviewer")
    registry.register_version(
        project,
        "bot",
        kind="base",
        source=_weights(tmp_path),
        format="safetensors",
        actor=developer.actor,
        author_id=developer.identity,
    )
    with pytest.raises(RegistryError) as direct:
        registry.set_alias(project, "bot", "production", 1, developer.actor)
    assert (direct.value.status_code, direct.value.code) == (409, "approval_required")
    with pytest.raises(RegistryError):
        registry.remove_alias(project, "bot", "production", developer.actor)

    approvals = ApprovalService(db, audit)
    approvals.register("model", registry)
    request = approvals.request(developer, "model", "bot", 1, "production", "ship it")
    with pytest.raises(ApprovalError) as own:
        approvals.approve(developer, request["id"])
    assert own.value.code == "four_eyes"
    decided = approvals.approve(reviewer, request["id"])
    assert decided["status"] == "approved"
    assert decided["label_event"]["to_version"] == 1
    assert registry.resolve(project, "bot@production")["version"] == 1
    history = registry.alias_history(project, "bot")
    assert history[0]["approval_id"] == request["id"]
    with pytest.raises(ApprovalError) as unprotected:
        approvals.request(developer, "model", "bot", 1, "staging")
    assert unprotected.value.code == "approval_not_needed"
    with pytest.raises(RegistryError) as missing:
        approvals.request(developer, "model", "bot", 5, "production")
    assert missing.value.status_code == 404


def test_projects_are_isolated(
    db: Database, registry: ModelRegistry, project: str, tmp_path: Path
) -> None:
    other = _new_project(db)
    mine = registry.register_version(
        project,
        "shared-name",
        kind="base",
        source=_weights(tmp_path),
        format="safetensors",
        actor="key:a",
    )
    assert registry.list_models(other) == []
    with pytest.raises(RegistryError) as hidden:
        registry.resolve(other, "shared-name@1")
    assert hidden.value.status_code == 404
    # The same name is free in another project, and cannot take a parent from this one.
    theirs = registry.register_version(
        other,
        "shared-name",
        kind="base",
        source=_weights(tmp_path),
        format="safetensors",
        actor="key:b",
    )
    assert theirs["version"] == 1 and theirs["id"] != mine["id"]
    assert registry.local_path(other, "shared-name@1") != registry.local_path(
        project, "shared-name@1"
    )
    assert theirs["served_name"] != mine["served_name"]
    with pytest.raises(RegistryError):
        registry.register_version(
            other,
            "child",
            kind="adapter",
            source=_weights(tmp_path, kind="adapter"),
            format="peft",
            actor="key:b",
            parent="only-mine@1",
        )
    registry.delete_model(other, "shared-name", "key:b")
    assert registry.resolve(project, "shared-name@1")["id"] == mine["id"]
    assert registry.local_path(project, "shared-name@1").is_dir()


def test_delete_removes_rows_files_and_history(
    registry: ModelRegistry, artifacts: ArtifactStore, project: str, tmp_path: Path
) -> None:
    registry.register_version(
        project,
        "gone",
        kind="base",
        source=_weights(tmp_path),
        format="safetensors",
        actor="key:dev",
    )
    registry.set_alias(project, "gone", "staging", 1, "key:dev")
    folder = registry.local_path(project, "gone@1")
    registry.delete_model(project, "gone", "key:dev")
    assert not folder.exists()
    assert registry.list_models(project) == []
    with pytest.raises(RegistryError):
        registry.alias_history(project, "gone")
    # A new model of the same name starts from version 1 with no old aliases.
    again = registry.register_version(
        project,
        "gone",
        kind="base",
        source=_weights(tmp_path),
        format="safetensors",
        actor="key:dev",
    )
    assert again["version"] == 1 and again["aliases"] == []
    assert registry.alias_history(project, "gone") == []
    assert "model.delete" in _audit_actions(registry.db, project)


# -- lineage and card -------------------------------------------------------------------------


def _chain(db: Database, registry: ModelRegistry, project: str, tmp_path: Path) -> dict[str, Any]:
    """dataset v1 → job → run → adapter (from base) → merged → quantized, with an eval."""
    datasets = DatasetStore(db, registry.audit)
    data, _ = datasets.create_version(
        project,
        "tickets",
        [
            {"messages": [{"role": "user", "content": f"q{i}"}], "expected": f"a{i}"}
            for i in range(5)
        ],
        author="key:dev",
    )
    base = registry.register_version(
        project,
        "smol",
        kind="base",
        source=_weights(tmp_path),
        format="safetensors",
        actor="key:dev",
    )
    job_id, run_id = uuid.uuid4().hex, uuid.uuid4().hex
    now = time.time()
    with db.session() as session:
        session.add(
            Job(
                id=job_id,
                project_id=project,
                kind="finetune",
                name="lora on tickets",
                params={},
                executor="local",
                status="succeeded",
                created_at=now,
                created_by="key:dev",
                author_id="key:dev",
            )
        )
        session.add(
            Run(
                id=run_id,
                project_id=project,
                job_id=job_id,
                experiment="support",
                name="lora-r8",
                kind="finetune",
                status="finished",
                params={"r": 8},
                summary={},
                system={},
                packages={},
                inputs=["tickets@1", base["id"]],
                artifacts={},
                created_at=now,
                created_by="key:dev",
            )
        )
    adapter = registry.register_version(
        project,
        "support",
        kind="adapter",
        source=_weights(tmp_path, kind="adapter"),
        format="peft",
        actor="key:dev",
        parent="smol@1",
        run_id=run_id,
        job_id=job_id,
        datasets=["tickets"],
        params={"lora_r": 8, "learning_rate": 2e-4, "epochs": 3},
        metrics={"eval_loss": {"before": 2.5, "after": 1.25}, "tokens_per_second": 900.0},
    )
    merged = registry.register_version(
        project,
        "support",
        kind="merged",
        source=_weights(tmp_path),
        format="safetensors",
        actor="key:dev",
        parent="support@1",
    )
    quantized = registry.register_version(
        project,
        "support",
        kind="quantized",
        source=_weights(tmp_path, kind="gguf"),
        format="gguf",
        actor="key:dev",
        parent="support@2",
        metrics={"size_mb_before": 540, "size_mb_after": 150},
    )
    eval_id = uuid.uuid4().hex
    with db.session() as session:
        session.add(
            EvalRun(
                id=eval_id,
                project_id=project,
                suite="support-quality",
                dataset="tickets",
                dataset_version=1,
                target=quantized["served_name"],
                resolved_target=quantized["served_name"],
                spec={},
                status="completed",
                total=5,
                done=5,
                summary={"passed": True, "scorers": {"exact": {"mean": 0.8}}},
                created_at=now,
                created_by="key:dev",
            )
        )
    return {
        "data": data,
        "base": base,
        "adapter": adapter,
        "merged": merged,
        "quantized": quantized,
        "job_id": job_id,
        "run_id": run_id,
        "eval_id": eval_id,
    }


def test_lineage_graph_from_dataset_to_route(
    db: Database, registry: ModelRegistry, project: str, tmp_path: Path
) -> None:
    chain = _chain(db, registry, project, tmp_path)
    served = chain["quantized"]["served_name"]
    routes = [
        {"name": "support", "targets": [{"model": served, "weight": 3}, {"model": "other"}]},
        {"name": "backup", "targets": [{"model": "other"}], "fallbacks": [served]},
        {"name": "unrelated", "targets": [{"model": "other"}]},
    ]
    graph = registry.lineage(project, "support@3", routes)
    nodes = {n["id"]: n for n in graph["nodes"]}
    edges = {(e["source"], e["target"], e["relation"]) for e in graph["edges"]}
    q, m, a, b = (f"model_version:{r}" for r in ("support@3", "support@2", "support@1", "smol@1"))
    dataset, run, job = "dataset:tickets@1", f"run:{chain['run_id']}", f"job:{chain['job_id']}"
    evaluation = f"eval_run:{chain['eval_id']}"
    assert graph["focus"] == q and nodes[q]["focus"] is True
    assert {(b, a, "parent"), (a, m, "parent"), (m, q, "parent")} <= edges
    assert {(dataset, run, "input"), (job, run, "executed"), (run, a, "produced")} <= edges
    assert (b, run, "input") in edges  # the run read the base version
    assert {(q, evaluation, "evaluated_by"), (dataset, evaluation, "evaluated_on")} <= edges
    assert (q, "route:support", "target") in edges and (q, "route:backup", "fallback") in edges
    assert "route:unrelated" not in nodes
    assert nodes[dataset]["items"] == 5 and nodes[dataset]["content_hash"]
    assert nodes[evaluation]["passed"] is True and nodes[evaluation]["scores"] == {"exact": 0.8}
    assert {n["type"] for n in graph["nodes"]} == {
        "dataset",
        "run",
        "job",
        "model_version",
        "eval_run",
        "route",
    }
    assert all(n["url"].startswith("/") for n in graph["nodes"])
    weight = next(e for e in graph["edges"] if e["target"] == "route:support")["weight"]
    assert weight == 3
    # The same graph from the module function, and nothing of it from another project.
    with db.session() as session:
        row = session.get(ModelVersion, chain["quantized"]["id"])
    assert row is not None
    assert lineage(db, project, row, routes)["edges"] == graph["edges"]
    with pytest.raises(ValueError):
        lineage(db, _new_project(db), row, routes)


def test_model_card_contents(
    db: Database, registry: ModelRegistry, project: str, tmp_path: Path
) -> None:
    chain = _chain(db, registry, project, tmp_path)
    registry.update_model(project, "support", "key:dev", description="Support answers.")
    card = registry.card(project, "support@1")
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "smol@1" and front["base_model_relation"] == "adapter"
    assert front["datasets"] == ["tickets@1"]
    assert "license" not in front  # unknown is left out, never invented
    assert set(front["tags"]) >= {"flywheel", "adapter", "peft"}
    for section in (
        "## Model details",
        "## Intended use",
        "## Limitations",
        "## Training data",
        "## Training procedure",
        "## Evaluation",
        "## Lineage",
        "## How to serve",
    ):
        assert section in card
    intended = card.split("## Intended use")[1].split("##")[0]
    assert "not stated" in intended
    assert "**License:** not stated" in card
    assert f"content hash `{chain['data']['content_hash']}`" in card and "5 items" in card
    assert "| lora_r | 8 |" in card
    assert "| eval_loss | 2.5 | 1.25 | -1.25 |" in card
    assert "| tokens_per_second | 900 |" in card
    assert "merge it into its base" in card

    registry.update_model(
        project, "support", "key:dev", license="apache-2.0", intended_use="Ticket replies."
    )
    quantized = registry.card(project, "support@3")
    front = yaml.safe_load(quantized.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["base_model_relation"] == "quantized"
    # Its training data is its ancestors': the adapter's dataset, found through the lineage.
    assert front["datasets"] == ["tickets@1"]
    assert "Ticket replies." in quantized
    assert "| size_mb | 540 | 150 | -390 |" in quantized
    assert "| support-quality | tickets@1 | completed | passed | exact 0.8 |" in quantized
    served = chain["quantized"]["served_name"]
    assert f"name: {served}" in quantized

    bare = model_card(
        {"name": "x", "license": "", "intended_use": "", "limitations": ""},
        {
            "ref": "x@1",
            "version": 1,
            "kind": "base",
            "format": "safetensors",
            "created_at": 0.0,
            "served_name": "x-v1",
        },
        None,
        [],
    )
    assert yaml.safe_load(bare.split("---\n")[1]) == {"tags": ["flywheel", "base", "safetensors"]}
    assert bare.count("not stated") >= 3 and "No metrics or eval runs are recorded." in bare


# -- serving -----------------------------------------------------------------------------------

DOCUMENT: dict[str, Any] = {
    "providers": {
        "local": {"type": "local"},
        "up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"},
    },
    "models": [
        {"name": "smollm2", "provider": "local", "source": "builtin:smollm2"},
        {"name": "up-echo", "provider": "up", "upstream_name": "echo"},
    ],
    "routes": [
        {"name": "default", "targets": [{"model": "smollm2"}]},
        {"name": "prod", "targets": [{"model": "smollm2"}], "production": True},
        {"name": "greet", "targets": [{"prompt": "greeting@production"}]},
    ],
}


def _valid(document: dict[str, Any]) -> FlywheelConfig:
    config = FlywheelConfig.model_validate(document)
    assert config.reference_errors() == []
    return config


def test_serving_patch_adds_model_and_routes() -> None:
    original = yaml.safe_dump(DOCUMENT)
    fresh = serving_patch(DOCUMENT, served_name="bot-v2", source="/m/bot", route="bot")
    config = _valid(fresh)
    assert yaml.safe_dump(DOCUMENT) == original  # the input is never changed
    served = next(m for m in config.models if m.name == "bot-v2")
    assert (served.provider, served.kind, served.source, served.status) == (
        "local",
        "chat",
        "/m/bot",
        "experimental",
    )
    assert [t.model for t in next(r for r in config.routes if r.name == "bot").targets] == [
        "bot-v2"
    ]

    canary = _valid(
        serving_patch(DOCUMENT, served_name="bot-v2", source="/m/bot", route="default", weight=0.1)
    )
    default = next(r for r in canary.routes if r.name == "default")
    assert [(t.model, t.weight) for t in default.targets] == [("smollm2", 1.0), ("bot-v2", 0.1)]
    replaced = _valid(
        serving_patch(
            DOCUMENT, served_name="bot-v2", source="/m/bot", route="default", replace=True
        )
    )
    assert [t.model for t in next(r for r in replaced.routes if r.name == "default").targets] == [
        "bot-v2"
    ]
    # Serving again is idempotent, and can promote the catalog entry.
    twice = serving_patch(
        canary.model_dump(mode="json", exclude_defaults=True),
        served_name="bot-v2",
        source="/m/bot",
        route="default",
        status="approved",
    )
    config = _valid(twice)
    assert [t.model for t in next(r for r in config.routes if r.name == "default").targets] == [
        "smollm2",
        "bot-v2",
    ]
    assert next(m for m in config.models if m.name == "bot-v2").status == "approved"
    prod = _valid(
        serving_patch(
            DOCUMENT, served_name="bot-v2", source="/m/bot", route="prod", status="approved"
        )
    )
    assert any(t.model == "bot-v2" for r in prod.routes if r.name == "prod" for t in r.targets)


@pytest.mark.parametrize(
    ("changes", "status", "code"),
    [
        ({"provider": "nowhere"}, 404, "provider_not_found"),
        ({"provider": "up"}, 400, "invalid_value"),
        ({"route": "prod"}, 400, "invalid_config"),  # experimental on a production route
        ({"route": "greet"}, 400, "invalid_value"),  # a prompt route
        ({"served_name": "default"}, 409, "conflict"),  # a route's name
        ({"source": "/other/weights", "served_name": "smollm2"}, 409, "conflict"),
        ({"route": "bad name"}, 400, "invalid_value"),
        ({"weight": 0}, 400, "invalid_value"),
    ],
)
def test_serving_patch_refusals(changes: dict[str, Any], status: int, code: str) -> None:
    arguments: dict[str, Any] = {"served_name": "bot-v2", "source": "/m/bot", "route": "bot"}
    with pytest.raises(RegistryError) as refused:
        serving_patch(DOCUMENT, **{**arguments, **changes})
    assert (refused.value.status_code, refused.value.code) == (status, code)


def test_serve_a_registered_version(db: Database, registry: ModelRegistry, tmp_path: Path) -> None:
    project = _new_project(db)
    registry.register_version(
        project,
        "bot",
        kind="base",
        source=_weights(tmp_path),
        format="safetensors",
        actor="key:dev",
    )
    registry.register_version(
        project,
        "bot",
        kind="quantized",
        source=_weights(tmp_path, kind="gguf"),
        format="gguf",
        actor="key:dev",
        parent="bot@1",
    )
    registry.register_version(
        project,
        "bot",
        kind="adapter",
        source=_weights(tmp_path, kind="adapter"),
        format="peft",
        actor="key:dev",
        parent="bot@1",
    )
    served = registry.serve(project, "bot@1", DOCUMENT, route="bot")
    assert served["served_name"] == served_name("bot", 1, project_id=project)
    assert served["served_name"] == f"{project}/bot-v1"
    assert served["source"] == str(registry.local_path(project, "bot@1"))
    config = _valid(served["document"])
    assert any(m.name == served["served_name"] for m in config.models)
    gguf = registry.serving_source(project, "bot@2")
    assert gguf.endswith(".gguf") and Path(gguf).is_file()
    with pytest.raises(RegistryError) as adapter:
        registry.serve(project, "bot@3", DOCUMENT, route="bot")
    assert (adapter.value.status_code, adapter.value.code) == (400, "not_servable")
    assert served_name("bot", 12, project_id=DEFAULT_PROJECT_ID) == "bot-v12"


def test_the_release_gate_finds_a_models_suites_by_served_name() -> None:
    from flywheel.evals.release import ReleaseGate

    assert ReleaseGate.target("default", "model", "bot", 3) == "bot-v3"
    assert ReleaseGate.target("team", "model", "bot", 3) == "team/bot-v3"
    assert ReleaseGate.target("team", "prompt", "ask", 2) == "prompt:ask@2"
    assert ReleaseGate._targets("team", "model", "bot", "team/bot-v12")
    assert not ReleaseGate._targets("team", "model", "bot", "bot-v12")
    assert not ReleaseGate._targets("default", "model", "bot", "bot-v1x")
    assert not ReleaseGate._targets("default", "model", "bot", "robot-v1")
    assert ReleaseGate._targets("default", "prompt", "ask", "prompt:ask@production")
