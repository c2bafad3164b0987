"""An index build whose documents changed while it ran is not made active: the build of the
ingest that changed them holds the newer documents (a job and a request, or two replicas,
building one knowledge base at once)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from flywheel.rag.index import Bm25Index, VectorIndex
from flywheel.rag.knowledge import KnowledgeBases
from flywheel.rag.loaders import LoadedDocument
from flywheel.security.audit import AuditLog
from flywheel.store import DEFAULT_PROJECT_ID, Database
from flywheel.store.artifacts import ArtifactStore


def test_a_stale_build_is_not_activated(database_url: str, tmp_path: Path) -> None:
    db = Database(database_url)
    db.migrate()
    kbs = KnowledgeBases(
        db, AuditLog(db), ArtifactStore(str(tmp_path / "artifacts")), pgvector=False
    )
    kbs.create(DEFAULT_PROJECT_ID, "notes", actor="test")
    first = LoadedDocument("a.txt", "The aardvark eats ants.", "text/plain")
    report = asyncio.run(kbs.ingest(DEFAULT_PROJECT_ID, "notes", [first], actor="test"))
    assert report.index_version == 1
    kb_id, settings, active = kbs.settings_of(DEFAULT_PROJECT_ID, "notes")
    ids, vectors, texts = kbs._index_inputs(kb_id, settings.embedder)
    vector_index = VectorIndex.build(ids, vectors, hnsw_threshold=settings.hnsw_threshold)
    bm25 = Bm25Index.build([int(i) for i in ids], texts)

    def save(pairs: list[tuple[str, str]]) -> int | None:
        return kbs._save_version(
            kb_id, settings.embedder, 384, {}, "digest", pairs, vector_index, bm25, "test"
        )

    # Built from a document list that is no longer the knowledge base's: refused.
    assert save([]) is None
    assert kbs.settings_of(DEFAULT_PROJECT_ID, "notes")[2] == active == 1
    # Built from the current documents: stored as the next version and made active.
    assert save(kbs._document_pairs(kb_id)) == 2
    assert kbs.settings_of(DEFAULT_PROJECT_ID, "notes")[2] == 2
    db.dispose()
