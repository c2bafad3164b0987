"""Knowledge bases end to end through the running server: ingest, index versions, search,
rag calls with citations over the OpenAI API, retrieval evaluation against pytrec_eval."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
import pytrec_eval

from tests.conftest import RunningServer, wait_for_trace
from tests.test_access import _key_client, _project_with_key
from tests.test_ui_prompts import ui_session

INSTALL = """# Installing Flywheel

Flywheel runs on Linux and macOS with Python 3.11 or newer.

## From PyPI

Run pip install flywheel-llmops inside a virtual environment, then start the server with
flywheel up. The web UI listens on port 8000.

## Upgrading

Stop the server, upgrade the package and start it again: migrations run at start-up.
"""
PASSWORDS = """Resetting a password

Users who forgot their password ask an administrator. The administrator opens the Users page
and sets a temporary password; the user must change it at the next login. Passwords are
stored as argon2 hashes and never shown again.
"""
BILLING = """team,topic,answer
billing,refunds,Refunds are paid back to the original card within five business days.
billing,invoices,Invoices are emailed on the first day of each month as PDF files.
"""
BAD_JSON = b'{"a": 1,\n "b": }\n'


def _upload(
    client: httpx.Client, kb: str, files: dict[str, bytes], metadata: dict | None = None
) -> dict:
    parts = [("files", (name, data)) for name, data in files.items()]
    form = {"metadata": json.dumps(metadata)} if metadata else None
    response = client.post(f"/api/kbs/{kb}/documents", files=parts, data=form)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def rag_project(server: RunningServer) -> Iterator[tuple[str, str]]:
    project, key = _project_with_key(server, f"rag-{secrets.token_hex(3)}")
    with _key_client(server, key) as client:
        created = client.post(
            "/api/kbs",
            json={
                "name": "handbook",
                "description": "The team handbook",
                "settings": {"chunker": {"strategy": "markdown", "chunk_tokens": 64}},
            },
        )
        assert created.status_code == 201, created.text
        report = _upload(
            client,
            "handbook",
            {
                "guide/install.md": INSTALL.encode(),
                "guide/passwords.txt": PASSWORDS.encode(),
                "billing.csv": BILLING.encode(),
                "broken.json": BAD_JSON,
            },
            metadata={"team": "platform"},
        )
        assert sorted(report["added"]) == ["billing.csv", "guide/install.md", "guide/passwords.txt"]
        assert [f["source"] for f in report["failed"]] == ["broken.json"]
        assert "line 2" in report["failed"][0]["problem"]
        assert report["index_version"] == 1
    yield project, key


def test_reingest_changes_only_changed_documents(server, rag_project) -> None:
    _, key = rag_project
    with _key_client(server, key) as client:
        again = _upload(client, "handbook", {"guide/install.md": INSTALL.encode()})
        assert again["unchanged"] == ["guide/install.md"] and again["index_version"] == 1
        twin = _upload(client, "handbook", {"copy-of-install.md": INSTALL.encode()})
        assert twin["duplicates"] == [
            {"source": "copy-of-install.md", "duplicate_of": "guide/install.md"}
        ]
        assert twin["index_version"] == 1
        changed = PASSWORDS + "\nAdministrators can also unlock accounts after five failures.\n"
        updated = _upload(client, "handbook", {"guide/passwords.txt": changed.encode()})
        assert updated["updated"] == ["guide/passwords.txt"] and updated["index_version"] == 2
        docs = client.get("/api/kbs/handbook/documents").json()
        assert docs["total"] == 3
        by_source = {d["source"]: d for d in docs["data"]}
        assert by_source["guide/passwords.txt"]["version"] == 2
        assert by_source["guide/install.md"]["version"] == 1
        assert by_source["guide/install.md"]["metadata"]["team"] == "platform"
        # Put the first text back: version 3 of the document, a new index version.
        restored = _upload(client, "handbook", {"guide/passwords.txt": PASSWORDS.encode()})
        assert restored["updated"] == ["guide/passwords.txt"]

        versions = client.get("/api/kbs/handbook/versions").json()["data"]
        newest = versions[0]
        assert newest["active"] and newest["embedder"] == "builtin:minilm"
        assert newest["chunker"]["strategy"] == "markdown" and newest["document_count"] == 3
        assert newest["vector_kind"] == "exact" and newest["dim"] == 384
        # Same documents as version 1, so the same digest: a version names its inputs.
        assert newest["digest"] == versions[-1]["digest"]


def test_chunks_keep_offsets_and_headings(server, rag_project) -> None:
    _, key = rag_project
    with _key_client(server, key) as client:
        docs = client.get("/api/kbs/handbook/documents", params={"q": "install"}).json()["data"]
        document = client.get(f"/api/kbs/handbook/documents/{docs[0]['id']}").json()
        text = document["text"]
        assert document["chunks"], document
        for chunk in document["chunks"]:
            assert text[chunk["start"] : chunk["end"]] == chunk["text"]
        # Each chunk knows the heading path where it starts (small sections are merged).
        assert document["chunks"][0]["headings"] == ["Installing Flywheel"]
        assert all(c["headings"][0] == "Installing Flywheel" for c in document["chunks"])


def test_search_modes_and_filters(server, rag_project) -> None:
    _, key = rag_project
    with _key_client(server, key) as client:
        for mode in ("dense", "bm25", "hybrid"):
            found = client.post(
                "/api/kbs/handbook/search",
                json={"query": "forgot my password", "mode": mode, "top_k": 3},
            ).json()
            assert found["hits"][0]["source"] == "guide/passwords.txt", (mode, found["hits"])
            assert found["mode"] == mode
        hybrid = client.post(
            "/api/kbs/handbook/search", json={"query": "when are refunds paid", "top_k": 2}
        ).json()
        top = hybrid["hits"][0]
        assert top["source"] == "billing.csv"
        assert top["dense_rank"] >= 1 and top["bm25_rank"] >= 1
        # The fused score is reciprocal rank fusion with k = 60.
        assert top["score"] == pytest.approx(
            1 / (60 + top["dense_rank"]) + 1 / (60 + top["bm25_rank"])
        )
        assert hybrid["dense"] and hybrid["bm25"]
        filtered = client.post(
            "/api/kbs/handbook/search",
            json={"query": "password", "filters": {"source": "guide/*.md"}},
        ).json()["hits"]
        assert filtered and {h["source"] for h in filtered} == {"guide/install.md"}
        none = client.post(
            "/api/kbs/handbook/search", json={"query": "password", "filters": {"team": "legal"}}
        ).json()
        assert none["hits"] == []
        missing = client.post("/api/kbs/nothing-here/search", json={"query": "x"})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"


def test_rag_route_answers_with_citations_and_traces_retrieval(server, rag_project) -> None:
    _, key = rag_project
    sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key)
    raw = sdk.chat.completions.with_raw_response.create(
        model="handbook-qa", messages=[{"role": "user", "content": "How do I reset a password?"}]
    )
    answer = raw.parse()
    citations = answer.model_extra["citations"]
    assert 1 <= len(citations) <= 2
    assert citations[0]["source"] == "guide/passwords.txt" and citations[0]["index"] == 1
    assert citations[0]["text"] and citations[0]["chunk_id"] > 0
    trace_id = raw.headers["x-flywheel-trace-id"]
    with _key_client(server, key) as client:
        spans = wait_for_trace(client, trace_id, kinds=("gateway.chat", "rag.retrieve"))["spans"]
    chat = next(s for s in spans if s["kind"] == "gateway.chat")
    retrieval = next(s for s in spans if s["kind"] == "rag.retrieve")
    assert retrieval["parent_id"] == chat["span_id"]
    assert retrieval["input"]["query"] == "How do I reset a password?"
    hits = retrieval["output"]["hits"]
    assert [h["chunk_id"] for h in hits] == [c["chunk_id"] for c in citations]
    assert hits[0]["score"] == pytest.approx(citations[0]["score"])
    # The model saw the passages first, numbered as the citations are.
    sent = chat["input"]["messages"]
    assert sent[0]["role"] == "system" and "[1] (guide/passwords.txt)" in sent[0]["content"]
    assert chat["attributes"]["flywheel.rag.knowledge_base"] == "handbook"
    # The trace page shows the retrieval step as a table of hits.
    with ui_session(server, key) as (ui, _):
        page = ui.get(f"/traces/{trace_id}").text
    assert "rag.retrieve" in page and "retrieval-hits" in page
    assert "guide/passwords.txt" in page and f"{hits[0]['score']:.4f}" in page


def test_rag_prefix_with_the_local_model_and_streaming(server, rag_project) -> None:
    _, key = rag_project
    sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key)
    answer = sdk.chat.completions.create(
        model="rag:handbook",
        messages=[{"role": "user", "content": "Which port does the web UI use?"}],
        max_tokens=24,
        temperature=0,
    )
    assert answer.choices[0].message.content
    assert answer.model_extra["citations"][0]["source"] == "guide/install.md"
    stream = sdk.chat.completions.create(
        model="rag:handbook",
        messages=[{"role": "user", "content": "Which port does the web UI use?"}],
        max_tokens=8,
        stream=True,
        extra_body={"retrieval": {"top_k": 1, "mode": "bm25"}},
    )
    chunks = list(stream)
    first = chunks[0].model_extra
    assert len(first["citations"]) == 1 and first["citations"][0]["source"] == "guide/install.md"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_rag_route_with_a_prompt(server, rag_project) -> None:
    _, key = rag_project
    with _key_client(server, key) as client:
        template = [
            {
                "role": "system",
                "content": "Sources:\n{% for h in hits %}- {{ h.source }}\n{% endfor %}",
            },
            {"role": "user", "content": "Q: {{ question }}"},
        ]
        assert (
            client.post("/api/prompts", json={"name": "rag-answer", "template": template})
        ).status_code == 201
        assert (
            client.put("/api/prompts/rag-answer/labels/staging", json={"version": 1}).status_code
            == 200
        )
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": "handbook-prompted",
                "messages": [{"role": "user", "content": "refund timing"}],
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        # The echo upstream answers the last user message: the prompt rendered the question.
        assert body["choices"][0]["message"]["content"] == "echo: Q: refund timing"
        assert body["citations"][0]["source"] == "billing.csv"
        trace_id = response.headers["x-flywheel-trace-id"]
        spans = wait_for_trace(client, trace_id, kinds=("gateway.chat",))["spans"]
        chat = next(s for s in spans if s["kind"] == "gateway.chat")
        assert chat["attributes"]["flywheel.prompt.name"] == "rag-answer"
        assert chat["model"] == "up-echo"


def test_rag_errors_are_clear(server, rag_project) -> None:
    _, key = rag_project
    with _key_client(server, key) as client:
        unknown = client.post(
            "/v1/chat/completions",
            json={"model": "rag:nope", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert unknown.status_code == 404
        assert "No knowledge base 'nope'" in unknown.json()["error"]["message"]
        no_question = client.post(
            "/v1/chat/completions",
            json={"model": "rag:handbook", "messages": [{"role": "system", "content": "x"}]},
        )
        assert no_question.status_code == 400
        assert no_question.json()["error"]["param"] == "messages"
        misplaced = client.post(
            "/v1/chat/completions",
            json={
                "model": "echo",
                "messages": [{"role": "user", "content": "hi"}],
                "retrieval": {"top_k": 2},
            },
        )
        assert misplaced.status_code == 400 and misplaced.json()["error"]["param"] == "retrieval"
        bad_option = client.post(
            "/v1/chat/completions",
            json={
                "model": "rag:handbook",
                "messages": [{"role": "user", "content": "hi"}],
                "retrieval": {"top_k": "many"},
            },
        )
        assert bad_option.status_code == 400
        assert bad_option.json()["error"]["param"] == "retrieval.top_k"
        for retrieval in ({"top_k": -3}, {"top_k": 100_000}, {"mode": "foo"}):
            refused = client.post(
                "/v1/chat/completions",
                json={
                    "model": "rag:handbook",
                    "messages": [{"role": "user", "content": "hi"}],
                    "retrieval": retrieval,
                },
            )
            assert refused.status_code == 400, retrieval
        for relevant in ({"a.md": "high"}, [{"nested": 1}]):
            malformed = client.post(
                "/api/kbs/handbook/eval", json={"items": [{"query": "q", "relevant": relevant}]}
            )
            assert malformed.status_code == 400, relevant
            assert malformed.json()["error"]["param"] == "items[0]"
        not_an_item = client.post("/api/kbs/handbook/eval", json={"items": [["x"]]})
        assert not_an_item.status_code == 400
        infinite = client.post(
            "/api/kbs/handbook/search", content='{"query": "x", "rrf_k": Infinity}'
        )
        assert infinite.status_code == 400
        odd_type = client.post(
            "/api/kbs/handbook/documents",
            json={"documents": [{"source": "x", "text": "y", "media_type": "image/png"}]},
        )
        assert odd_type.status_code == 400
        assert odd_type.json()["error"]["param"] == "documents[0].media_type"
        # An embedder no index can be built with is refused and not kept.
        unknown = client.patch("/api/kbs/handbook", json={"settings": {"embedder": "nope"}})
        assert unknown.status_code == 404
        assert client.get("/api/kbs/handbook").json()["settings"]["embedder"] == "builtin:minilm"
        bad_settings = client.post(
            "/api/kbs", json={"name": "x1", "settings": {"chunker": {"chunk_tokens": 2}}}
        )
        assert bad_settings.status_code == 400
        assert "settings.chunker.chunk_tokens" in bad_settings.json()["error"]["message"]
        taken = client.post("/api/kbs", json={"name": "handbook"})
        assert taken.status_code == 409


def test_retrieval_span_follows_the_routes_capture_mode(server, rag_project) -> None:
    _, key = rag_project
    with _key_client(server, key) as client:
        call = client.post(
            "/v1/chat/completions",
            json={
                "model": "handbook-metadata",
                "messages": [{"role": "user", "content": "password help for alice@example.com"}],
            },
        )
        assert call.status_code == 200, call.text
        trace_id = call.headers["x-flywheel-trace-id"]
        spans = wait_for_trace(client, trace_id, kinds=("rag.retrieve",))["spans"]
    retrieval = next(s for s in spans if s["kind"] == "rag.retrieve")
    assert "query" not in retrieval["input"]
    assert retrieval["output"]["hits"] and all("text" not in h for h in retrieval["output"]["hits"])
    assert "alice@example.com" not in json.dumps(spans)


def test_url_ingestion_refuses_private_addresses(server, rag_project) -> None:
    _, key = rag_project
    with _key_client(server, key) as client:
        report = client.post(
            "/api/kbs/handbook/urls",
            json={"urls": [f"{server.base_url}/healthz", "http://169.254.169.254/latest"]},
        ).json()
    assert [f["source"] for f in report["failed"]] == [
        f"{server.base_url}/healthz",
        "http://169.254.169.254/latest",
    ]
    assert report["added"] == [] and report["index_version"] is not None


def test_retrieval_eval_matches_pytrec_eval(server, rag_project) -> None:
    _, key = rag_project
    items = [
        {"query": "reset a forgotten password", "relevant": ["guide/passwords.txt"]},
        {"query": "how to upgrade the server", "relevant": {"guide/install.md": 2}},
        {"query": "invoices and refunds", "relevant": ["billing.csv", "guide/passwords.txt"]},
        {"query": "python version needed", "relevant": ["guide/install.md"]},
        {"query": "unlabelled", "relevant": []},
    ]
    with _key_client(server, key) as client:
        response = client.post(
            "/api/kbs/handbook/eval", json={"items": items, "ks": [1, 3], "level": "document"}
        )
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["queries"] == 5 and report["skipped"] == 1
    for mode in ("dense", "bm25", "hybrid"):
        qrels, run = {}, {}
        for i, row in enumerate(report["per_query"][:4]):
            relevant = items[i]["relevant"]
            grades = relevant if isinstance(relevant, dict) else dict.fromkeys(relevant, 1)
            qrels[f"q{i}"] = grades
            retrieved = row["modes"][mode]["retrieved"]
            run[f"q{i}"] = {doc: float(len(retrieved) - r) for r, doc in enumerate(retrieved)}
        measures = {"recall.1,3", "P.1,3", "recip_rank", "ndcg_cut.1,3", "success.1,3"}
        reference = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
        ours = report["modes"][mode]
        for ours_key, ref_key in (
            ("recall@3", "recall_3"),
            ("precision@1", "P_1"),
            ("precision@3", "P_3"),
            ("mrr", "recip_rank"),
            ("ndcg@3", "ndcg_cut_3"),
            ("hit@1", "success_1"),
        ):
            expected = float(np.mean([reference[q][ref_key] for q in reference]))
            assert ours[ours_key] == pytest.approx(expected, abs=1e-9), (mode, ours_key)
    assert report["modes"]["hybrid"]["hit@3"] == 1.0


def test_changing_the_embedder_builds_a_new_index_version(server, rag_project) -> None:
    _, key = rag_project
    with _key_client(server, key) as client:
        before = client.get("/api/kbs/handbook").json()["index"]["version"]
        patched = client.patch(
            "/api/kbs/handbook", json={"settings": {"embedder": "all-minilm-l6-v2"}}
        )
        assert patched.status_code == 200, patched.text
        index = patched.json()["index"]
        assert index["version"] == before + 1 and index["embedder"] == "all-minilm-l6-v2"
        found = client.post(
            "/api/kbs/handbook/search", json={"query": "forgot my password", "mode": "dense"}
        ).json()
        assert found["hits"][0]["source"] == "guide/passwords.txt"
        assert found["index_version"] == index["version"]
        # Back to the bundled embedder: the old chunks' embeddings are recomputed, not mixed.
        back = client.patch("/api/kbs/handbook", json={"settings": {"embedder": "builtin:minilm"}})
        assert back.json()["index"]["embedder"] == "builtin:minilm"


def test_projects_do_not_see_each_others_knowledge_bases(server, rag_project) -> None:
    _, other_key = _project_with_key(server, f"rag-other-{secrets.token_hex(3)}")
    with _key_client(server, other_key) as other:
        assert other.get("/api/kbs").json()["data"] == []
        assert other.get("/api/kbs/handbook").status_code == 404
        assert other.post("/api/kbs/handbook/search", json={"query": "x"}).status_code == 404
        call = other.post(
            "/v1/chat/completions",
            json={"model": "handbook-qa", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert call.status_code == 404


def test_deleting_a_document_rebuilds_the_index(server) -> None:
    _, key = _project_with_key(server, f"rag-del-{secrets.token_hex(3)}")
    with _key_client(server, key) as client:
        assert client.post("/api/kbs", json={"name": "tmp"}).status_code == 201
        report = client.post(
            "/api/kbs/tmp/documents",
            json={
                "documents": [
                    {"source": "a", "text": "Alpha particles are helium nuclei."},
                    {"source": "b", "text": "Beta decay emits an electron."},
                ]
            },
        ).json()
        assert report["index_version"] == 1
        docs = {d["source"]: d["id"] for d in client.get("/api/kbs/tmp/documents").json()["data"]}
        deleted = client.delete(f"/api/kbs/tmp/documents/{docs['a']}").json()
        assert deleted["index_version"] == 2
        hits = client.post("/api/kbs/tmp/search", json={"query": "helium"}).json()["hits"]
        assert [h["source"] for h in hits] == ["b"]
        assert client.delete("/api/kbs/tmp").status_code == 204
        assert client.get("/api/kbs/tmp").status_code == 404


def test_llm_rerank_reorders_the_first_hits(server) -> None:
    _, key = _project_with_key(server, f"rag-rerank-{secrets.token_hex(3)}")
    documents = [
        {"source": f"doc{i}", "text": f"Note {i}: the quarterly report covers topic {i}."}
        for i in range(5)
    ]
    with _key_client(server, key) as client:
        settings = {"rerank": {"model": "up-rerank", "top_n": 3}, "mode": "bm25"}
        assert client.post("/api/kbs", json={"name": "notes", "settings": settings}).is_success
        assert client.post("/api/kbs/notes/documents", json={"documents": documents}).is_success
        query = {"query": "quarterly report topic 3", "top_k": 4}
        plain = client.post("/api/kbs/notes/search", json={**query, "rerank": False}).json()
        ranked = client.post("/api/kbs/notes/search", json=query).json()
        before = [h["chunk_id"] for h in plain["hits"]]
        after = [h["chunk_id"] for h in ranked["hits"]]
        # The reranker reversed the first three; the fourth keeps its place.
        assert after == [*before[:3][::-1], before[3]]
        assert [h["rank"] for h in ranked["hits"]] == [1, 2, 3, 4]
        assert [h["retrieval_rank"] for h in ranked["hits"][:3]] == [3, 2, 1]
        assert all(h["reranked"] for h in ranked["hits"][:3])
        # A reranker that fails leaves the retrieval order, and says so.
        broken = {"settings": {"rerank": {"model": "up-500", "top_n": 3}}}
        assert client.patch("/api/kbs/notes", json=broken).is_success
        kept = client.post("/api/kbs/notes/search", json=query).json()["hits"]
        assert [h["chunk_id"] for h in kept] == before
        assert kept[0]["reranked"] is False


def test_retrieval_eval_from_a_dataset_version(server, rag_project) -> None:
    _, key = rag_project
    items = [
        {"question": "reset a forgotten password", "relevant": ["guide/passwords.txt"]},
        {"variables": {"query": "invoices"}, "metadata": {"relevant": ["billing.csv"]}},
    ]
    with _key_client(server, key) as client:
        created = client.post("/api/datasets", json={"name": "kb-queries", "items": items})
        assert created.status_code == 201, created.text
        report = client.post(
            "/api/kbs/handbook/eval", json={"dataset": "kb-queries", "ks": [1], "modes": ["bm25"]}
        ).json()
        assert report["queries"] == 2 and report["skipped"] == 0
        assert report["modes"]["bm25"]["hit@1"] == 1.0
        both = client.post("/api/kbs/handbook/eval", json={"dataset": "kb-queries", "items": items})
        assert both.status_code == 400 and both.json()["error"]["param"] == "dataset"
        unlabelled = client.post(
            "/api/kbs/handbook/eval", json={"items": [{"query": "no labels here"}]}
        )
        assert unlabelled.status_code == 400
        assert unlabelled.json()["error"]["param"] == "items[0]"
