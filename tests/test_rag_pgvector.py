"""Knowledge bases on PostgreSQL with pgvector: dense search in a ``vector`` column (HNSW,
cosine), keywords through Postgres full text, fused like the FAISS path, through the server API.

Debian 12 has no pgvector package, so this module starts its own PostgreSQL from the binaries
of the ``pgserver`` wheel (PostgreSQL 16 with pgvector; tests/pg.py) and runs two Flywheel
servers on one database there, each with its own home: the second replica never sees the
first one's artifact folder, so every search it answers comes from the database. The same
documents and queries on the session's server (SQLite, or PostgreSQL without pgvector) give
the FAISS + bm25s reference.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import RunningServer, start_server, stop_server
from tests.pg import PostgresServer, pgserver_bindir
from tests.test_access import _key_client, _project_with_key

PGSERVER_BIN = pgserver_bindir()
pytestmark = pytest.mark.skipif(
    PGSERVER_BIN is None,
    reason="pgserver is not installed (pip install pgserver==0.1.4, a dev dependency): "
    "no PostgreSQL with pgvector to test against",
)

CONFIG = """
providers:
  local: {type: local}
models:
  - {name: all-minilm-l6-v2, provider: local, kind: embedding, source: "builtin:minilm"}
"""
DOCUMENTS = {
    "guide/install.md": "# Installing Flywheel\n\nFlywheel runs on Linux and macOS with Python "
    "3.11 or newer. Run pip install flywheel-llmops inside a virtual environment, then start "
    "the server with flywheel up. The web UI listens on port 8000.",
    "guide/passwords.txt": "Resetting a password. Users who forgot their password ask an "
    "administrator. The administrator opens the Users page and sets a temporary password; "
    "the user must change it at the next login.",
    "billing/refunds.txt": "Refunds are paid back to the original card within five business "
    "days after the return arrives at the warehouse.",
    "billing/invoices.txt": "Invoices are emailed on the first day of each month as PDF files "
    "to the billing contact of the account.",
    "ops/backups.md": "# Backups\n\nThe database is backed up every night at two o'clock; "
    "snapshots are kept for thirty days and restored with the restore command.",
    "ops/alerts.md": "# Alerts\n\nWhen latency rises above the threshold an alert is sent to "
    "the on-call engineer by email and to the chat channel.",
    "team/holidays.txt": "Employees get twenty-five days of paid holiday a year; requests go "
    "to the team lead at least two weeks ahead.",
    "team/onboarding.txt": "New hires receive a laptop on their first day and meet their "
    "mentor, who walks them through the codebase and the deployment process.",
}
QUERIES = {
    "forgot my password": "guide/passwords.txt",
    "when are refunds paid back": "billing/refunds.txt",
    "how do I install flywheel with pip": "guide/install.md",
    "how long are database snapshots kept": "ops/backups.md",
    "paid holiday requests": "team/holidays.txt",
    "invoices emailed as PDF": "billing/invoices.txt",
}
MODES = ("dense", "bm25", "hybrid")


def _documents(items: dict[str, str], **metadata: str) -> dict:
    return {
        "documents": [
            {"source": source, "text": text, "metadata": metadata} for source, text in items.items()
        ]
    }


def _search(client: httpx.Client, kb: str, query: str, **body: object) -> dict:
    response = client.post(f"/api/kbs/{kb}/search", json={"query": query, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _sql(url: str, pg: PostgresServer, query: str, *params: object) -> list[tuple]:
    with psycopg.connect(pg.dsn(str(make_url(url).database))) as connection:
        return connection.execute(query, params).fetchall()


def _tables(url: str, pg: PostgresServer) -> set[str]:
    rows = _sql(
        url, pg, "SELECT tablename FROM pg_tables WHERE starts_with(tablename, 'kb_vectors_')"
    )
    return {row[0] for row in rows}


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    assert PGSERVER_BIN is not None
    running = PostgresServer.start(bindir=PGSERVER_BIN)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, pg: PostgresServer
) -> Iterator[list[RunningServer]]:
    shared = tmp_path_factory.mktemp("pgvector")
    admin_key = "fw-pgvector-" + secrets.token_hex(16)
    env = {
        "FLYWHEEL_DATABASE_URL": pg.create_database("pgvector"),
        "FLYWHEEL_MASTER_KEY": "B" * 43,
        "FLYWHEEL_PRELOAD_MODELS": "false",
    }
    first = start_server(shared / "a", CONFIG, admin_key, env, ready_path="/healthz")
    second = start_server(shared / "b", CONFIG, admin_key, env, ready_path="/healthz")
    yield [first, second]
    for server in (first, second):
        stop_server(server)


@pytest.fixture(scope="module")
def handbook(replicas: list[RunningServer]) -> str:
    """A project on the replicas with the ``handbook`` knowledge base; returns its key."""
    _, key = _project_with_key(replicas[0], f"pgv-{secrets.token_hex(3)}")
    with _key_client(replicas[0], key) as client:
        assert client.post("/api/kbs", json={"name": "handbook"}).status_code == 201
        report = client.post(
            "/api/kbs/handbook/documents", json=_documents(DOCUMENTS, team="ops")
        ).json()
        assert sorted(report["added"]) == sorted(DOCUMENTS) and report["index_version"] == 1
    return key


def _artifact_files(server: RunningServer) -> list[Path]:
    folder = server.home / "artifacts" / "kb"
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def test_index_versions_live_in_the_database(replicas, handbook, pg) -> None:
    first, second = replicas
    with _key_client(second, handbook) as client:
        version = client.get("/api/kbs/handbook/versions").json()["data"][0]
        assert version["active"] and version["dim"] == 384
        assert version["artifacts"]["backend"] == "pgvector"
        assert version["artifacts"]["text_search"] == "english"
        assert version["vector_kind"] == "exact"  # below the HNSW threshold, as on FAISS
        assert version["chunk_count"] == len(DOCUMENTS)
        table = version["artifacts"]["table"]
    assert _tables(first.database_url, pg) == {table}
    rows = _sql(first.database_url, pg, f'SELECT count(*), min(version) FROM "{table}"')
    assert rows == [(len(DOCUMENTS), 1)]
    # Nothing was written to either replica's artifact store.
    assert _artifact_files(first) == [] and _artifact_files(second) == []


def test_search_ranks_like_the_faiss_path(replicas, handbook, server) -> None:
    """The same documents and queries on the session's server (FAISS + bm25s): the same top
    document in every mode, and identical dense rankings and scores (same embedder, exact
    cosine on both)."""
    _, reference_key = _project_with_key(server, f"pgv-ref-{secrets.token_hex(3)}")
    with (
        _key_client(server, reference_key) as reference,
        _key_client(replicas[1], handbook) as client,
    ):
        assert reference.post("/api/kbs", json={"name": "handbook"}).status_code == 201
        added = reference.post("/api/kbs/handbook/documents", json=_documents(DOCUMENTS))
        assert added.status_code == 200, added.text
        artifacts = reference.get("/api/kbs/handbook").json()["index"]["artifacts"]
        if artifacts.get("backend") == "pgvector":
            pytest.skip("the session's server keeps its index in pgvector too: no FAISS reference")
        for query, expected in QUERIES.items():
            for mode in MODES:
                ours = _search(client, "handbook", query, mode=mode, top_k=5)
                theirs = _search(reference, "handbook", query, mode=mode, top_k=5)
                assert ours["hits"][0]["source"] == expected, (query, mode, ours["hits"])
                assert theirs["hits"][0]["source"] == expected, (query, mode, theirs["hits"])
                if mode == "dense":
                    assert [h["source"] for h in ours["hits"]] == [
                        h["source"] for h in theirs["hits"]
                    ]
                    for mine, faiss_hit in zip(ours["hits"], theirs["hits"], strict=True):
                        assert mine["score"] == pytest.approx(faiss_hit["score"], abs=1e-5)
            hybrid = _search(client, "handbook", query, top_k=3)
            top = hybrid["hits"][0]
            # Fused by reciprocal rank with k = 60, exactly as on FAISS.
            assert top["score"] == pytest.approx(
                1 / (60 + top["dense_rank"]) + 1 / (60 + top["bm25_rank"])
            )
            assert hybrid["dense"] and hybrid["bm25"] and hybrid["mode"] == "hybrid"
        assert reference.delete("/api/kbs/handbook").status_code == 204


def test_keyword_search_is_case_insensitive_and_stems(replicas, handbook) -> None:
    with _key_client(replicas[0], handbook) as client:
        upper = _search(client, "handbook", "REFUNDS", mode="bm25")["hits"]
        stemmed = _search(client, "handbook", "refunding", mode="bm25")["hits"]
        assert upper[0]["source"] == stemmed[0]["source"] == "billing/refunds.txt"
        assert upper[0]["bm25_score"] > 0
        # Only stop words: nothing to match, and no error.
        assert _search(client, "handbook", "the and of", mode="bm25")["hits"] == []


def test_filters_select_documents(replicas, handbook) -> None:
    with _key_client(replicas[1], handbook) as client:
        ops = {"ops/backups.md", "ops/alerts.md"}
        for mode in MODES:
            hits = _search(
                client, "handbook", "database alert", mode=mode, filters={"source": "ops/*.md"}
            )["hits"]
            assert {h["source"] for h in hits} == ops, (mode, hits)
        # Dense search ranks whatever the filter leaves; keywords need a matching word.
        dense = _search(client, "handbook", "password", mode="dense", filters={"source": "ops/*"})
        assert {h["source"] for h in dense["hits"]} == ops
        bm25 = _search(client, "handbook", "password", mode="bm25", filters={"source": "ops/*"})
        assert bm25["hits"] == []
        assert _search(client, "handbook", "password", filters={"team": "legal"})["hits"] == []
        assert _search(client, "handbook", "password", filters={"team": "ops"})["hits"]


def test_reingest_skips_unchanged_documents(replicas, handbook, pg) -> None:
    first, second = replicas
    with _key_client(first, handbook) as client, _key_client(second, handbook) as other:
        before = client.get("/api/kbs/handbook").json()["index"]["version"]
        again = client.post(
            "/api/kbs/handbook/documents", json=_documents(DOCUMENTS, team="ops")
        ).json()
        assert sorted(again["unchanged"]) == sorted(DOCUMENTS)
        assert again["index_version"] == before and again["chunks"] == 0
        changed = {"team/holidays.txt": DOCUMENTS["team/holidays.txt"] + " Unused days expire."}
        updated = client.post(
            "/api/kbs/handbook/documents", json=_documents(changed, team="ops")
        ).json()
        assert updated["updated"] == ["team/holidays.txt"]
        assert updated["index_version"] == before + 1
        # The other replica finds the new text at once, and only one row for the document.
        hits = _search(other, "handbook", "unused days expire", mode="bm25")["hits"]
        assert hits[0]["source"] == "team/holidays.txt" and hits[0]["document_version"] == 2
        table = other.get("/api/kbs/handbook").json()["index"]["artifacts"]["table"]
    rows = _sql(first.database_url, pg, f'SELECT version, count(*) FROM "{table}" GROUP BY 1')
    # Unchanged documents kept their rows from version 1; the updated one has new rows.
    assert dict(rows) == {1: len(DOCUMENTS) - 1, before + 1: 1}


def test_second_replica_sees_new_documents(replicas, handbook) -> None:
    first, second = replicas
    with _key_client(first, handbook) as client, _key_client(second, handbook) as other:
        text = "The espresso machine on the third floor is descaled every Friday."
        report = client.post(
            "/api/kbs/handbook/documents",
            json={"documents": [{"source": "office/coffee.txt", "text": text}]},
        ).json()
        assert report["added"] == ["office/coffee.txt"]
        for mode in MODES:
            found = _search(other, "handbook", "when is the espresso machine descaled", mode=mode)
            assert found["hits"][0]["source"] == "office/coffee.txt", (mode, found["hits"])
            assert found["index_version"] == report["index_version"]
    assert _artifact_files(first) == [] and _artifact_files(second) == []


def test_deleting_a_document_removes_it_from_search(replicas, handbook, pg) -> None:
    first, second = replicas
    with _key_client(first, handbook) as client, _key_client(second, handbook) as other:
        assert _search(other, "handbook", "refunds", mode="bm25")["hits"]
        docs = {
            d["source"]: d["id"] for d in client.get("/api/kbs/handbook/documents").json()["data"]
        }
        deleted = client.delete(f"/api/kbs/handbook/documents/{docs['billing/refunds.txt']}")
        assert deleted.status_code == 200, deleted.text
        assert _search(other, "handbook", "refunds", mode="bm25")["hits"] == []
        for mode in ("dense", "hybrid"):
            hits = _search(other, "handbook", "when are refunds paid back", mode=mode)["hits"]
            assert "billing/refunds.txt" not in {h["source"] for h in hits}
        table = other.get("/api/kbs/handbook").json()["index"]["artifacts"]["table"]
    # Its rows went with its chunks (the table's foreign key cascades).
    rows = _sql(
        first.database_url,
        pg,
        f'SELECT count(*) FROM "{table}" WHERE document_id = %s',
        docs["billing/refunds.txt"],
    )
    assert rows == [(0,)]


def test_hnsw_index_above_the_threshold(replicas, pg) -> None:
    first, second = replicas
    _, key = _project_with_key(first, f"pgv-hnsw-{secrets.token_hex(3)}")
    topics = [
        "volcanoes",
        "glaciers",
        "coral reefs",
        "deserts",
        "rainforests",
        "tundra",
        "savannas",
        "mangroves",
    ]
    items = {
        f"notes/{topic.replace(' ', '-')}-{part}.txt": f"Field note {part} about {topic}: "
        f"observations of {topic} recorded on expedition day {part}."
        for topic in topics
        for part in range(5)
    }
    with _key_client(first, key) as client, _key_client(second, key) as other:
        created = client.post(
            "/api/kbs", json={"name": "notes", "settings": {"hnsw_threshold": 20}}
        )
        assert created.status_code == 201, created.text
        assert client.post("/api/kbs/notes/documents", json=_documents(items)).is_success
        version = other.get("/api/kbs/notes").json()["index"]
        assert version["vector_kind"] == "hnsw" and version["chunk_count"] == len(items)
        table = version["artifacts"]["table"]
        indexes = _sql(
            first.database_url, pg, "SELECT indexdef FROM pg_indexes WHERE tablename = %s", table
        )
        assert any("USING hnsw" in row[0] and "vector_cosine_ops" in row[0] for row in indexes)
        for topic in topics:
            hits = _search(other, "notes", f"observations of {topic}", mode="dense", top_k=5)
            assert len(hits["hits"]) == 5
            assert all(topic.replace(" ", "-") in h["source"] for h in hits["hits"]), hits
        # A filter leaving few chunks is answered exactly, and in full.
        filtered = _search(
            other,
            "notes",
            "observations of volcanoes",
            mode="dense",
            top_k=3,
            filters={"source": "notes/glaciers-*"},
        )["hits"]
        assert len(filtered) == 3 and all("glaciers" in h["source"] for h in filtered)


def test_changing_the_embedder_moves_to_a_new_table(replicas, pg) -> None:
    first, second = replicas
    _, key = _project_with_key(first, f"pgv-emb-{secrets.token_hex(3)}")
    with _key_client(first, key) as client, _key_client(second, key) as other:
        assert client.post("/api/kbs", json={"name": "swap"}).status_code == 201
        assert client.post("/api/kbs/swap/documents", json=_documents(DOCUMENTS)).is_success
        old = client.get("/api/kbs/swap").json()["index"]["artifacts"]["table"]
        patched = client.patch("/api/kbs/swap", json={"settings": {"embedder": "all-minilm-l6-v2"}})
        assert patched.status_code == 200, patched.text
        index = patched.json()["index"]
        new = index["artifacts"]["table"]
        assert index["embedder"] == "all-minilm-l6-v2" and new != old
        tables = _tables(first.database_url, pg)
        assert new in tables and old not in tables
        found = _search(other, "swap", "forgot my password", mode="dense")
        assert found["hits"][0]["source"] == "guide/passwords.txt"
        assert found["index_version"] == index["version"]
        assert client.delete("/api/kbs/swap").status_code == 204
    assert new not in _tables(first.database_url, pg)
