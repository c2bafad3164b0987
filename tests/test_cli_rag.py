"""``flywheel kb`` and ``flywheel pipelines`` against the running server, and the SDK's
``client.kbs`` / ``client.pipelines``."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from flywheel.sdk import Client, FlywheelError
from tests.test_access import _project_with_key
from tests.test_cli import _run

DOCS = {
    "guide/setup.md": "# Setup\n\nInstall the agent with apt install fw-agent, then enable it.",
    "guide/rotate.md": "# Rotating keys\n\nKeys are rotated every ninety days by the admin.",
    "notes.txt": "The cafeteria serves soup on Fridays.",
    ".hidden/secret.md": "never ingested",
    "image.png": "not a document",
}


@pytest.fixture(scope="module")
def key(server) -> str:
    return _project_with_key(server, f"cli-rag-{secrets.token_hex(3)}")[1]


def _folder(root: Path) -> Path:
    for name, text in DOCS.items():
        path = root / "docs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "docs"


def test_kb_commands(server, key, tmp_path: Path) -> None:
    created = _run(server, "kb", "create", "ops", "--chunk-tokens", "64", key=key)
    assert created.returncode == 0, created.stderr
    folder = _folder(tmp_path)
    ingested = _run(server, "kb", "ingest", "ops", str(folder), key=key)
    assert ingested.returncode == 0, ingested.stderr
    assert "added 3, updated 0, unchanged 0, duplicates 0, failed 0; index version 1" in (
        ingested.stdout
    )
    again = _run(server, "kb", "ingest", "ops", str(folder), key=key)
    assert "added 0, updated 0, unchanged 3" in again.stdout and "index version 1" in again.stdout

    found = _run(server, "kb", "search", "ops", "how often are keys rotated", "--json", key=key)
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)["hits"]
    assert hits[0]["source"] == "guide/rotate.md"
    table = _run(server, "kb", "search", "ops", "fw-agent", "--mode", "bm25", key=key)
    assert "guide/setup.md" in table.stdout and "bm25 search" in table.stdout

    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        "\n".join(
            json.dumps(item)
            for item in [
                {"query": "key rotation schedule", "relevant": ["guide/rotate.md"]},
                {"query": "installing the agent", "relevant": ["guide/setup.md"]},
            ]
        )
    )
    report = _run(server, "kb", "eval", "ops", "--file", str(labels), "-k", "1", key=key)
    assert report.returncode == 0, report.stderr
    assert "hit@1" in report.stdout and "ndcg@1" in report.stdout and "2 queries" in report.stdout
    listing = _run(server, "kb", "list", key=key)
    assert "ops" in listing.stdout and "builtin:minilm" in listing.stdout

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"query": "x", "relevant": ["a"]}\n{oops\n')
    bad = _run(server, "kb", "eval", "ops", "--file", str(broken), key=key)
    assert bad.returncode == 1 and f"{broken}:2: invalid JSON" in bad.stderr
    missing = _run(server, "kb", "search", "nope", "x", key=key)
    assert missing.returncode == 1 and "No knowledge base 'nope'" in missing.stderr


def test_pipelines_commands(server, key, tmp_path: Path) -> None:
    spec = tmp_path / "shout.yaml"
    spec.write_text(
        "name: shout\n"
        "inputs: [text]\n"
        "steps:\n"
        "  - {id: said, type: llm, model: echo, messages: [{role: user, content: '{{ text }}!'}]}\n"
        "  - {id: n, type: tool, python: word_count, args: {text: '{{ said }}'}}\n"
        "output: '{{ said }} ({{ n }})'\n"
    )
    saved = _run(server, "pipelines", "put", str(spec), key=key)
    assert saved.returncode == 0, saved.stderr
    assert "saved pipeline shout version 1" in saved.stdout
    ran = _run(server, "pipelines", "run", "shout", "-i", "text=hello there", key=key)
    assert ran.returncode == 0, ran.stderr
    assert "echo: hello there! (3)" in ran.stdout
    assert "said" in ran.stdout and "trace " in ran.stdout
    listed = _run(server, "pipelines", "list", key=key)
    assert "shout" in listed.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace("python: word_count", "python: no_such_tool"))
    checked = _run(server, "pipelines", "validate", str(bad), key=key)
    assert checked.returncode == 1
    assert str(bad) in checked.stdout and "step 'n' (tool)" in checked.stdout
    assert "no_such_tool" in checked.stdout


def test_sdk_knowledge_bases_and_pipelines(server, key) -> None:
    with Client(base_url=server.base_url, api_key=key) as client:
        client.kbs.create("sdk-kb", description="from the SDK")
        report = client.kbs.upload(
            "sdk-kb",
            [("faq.md", b"# FAQ\n\nParking is free after six pm."), ("bad.json", b"{")],
            metadata={"team": "facilities"},
        )
        assert report["added"] == ["faq.md"] and report["failed"][0]["source"] == "bad.json"
        texts = client.kbs.add_texts("sdk-kb", [{"source": "menu", "text": "Soup on Fridays."}])
        assert texts["added"] == ["menu"] and texts["index_version"] == 2
        hits = client.kbs.search("sdk-kb", "where can I park", top_k=1)["hits"]
        assert hits[0]["source"] == "faq.md" and hits[0]["metadata"]["team"] == "facilities"
        document = client.kbs.document("sdk-kb", hits[0]["document_id"])
        assert document["chunks"][0]["text"] in document["text"]
        assert [v["version"] for v in client.kbs.versions("sdk-kb")] == [2, 1]
        evaluated = client.kbs.evaluate(
            "sdk-kb", items=[{"query": "parking", "relevant": ["faq.md"]}], ks=[1], modes=["bm25"]
        )
        assert evaluated["modes"]["bm25"]["hit@1"] == 1.0
        with pytest.raises(FlywheelError) as missing:
            client.kbs.get("nope")
        assert missing.value.status_code == 404

        spec = (
            "name: sdk-pipe\ninputs: [q]\nsteps:\n"
            "  - {id: docs, type: retrieve, knowledge_base: sdk-kb, query: '{{ q }}', top_k: 1}\n"
            "output: '{{ docs[0].source }}'\n"
        )
        assert client.pipelines.validate(spec)["valid"]
        assert client.pipelines.put("sdk-pipe", spec)["version"] == 1
        run = client.pipelines.run("sdk-pipe", {"q": "soup"})
        assert run["status"] == "ok" and run["output"] == "menu"
        assert client.pipelines.get("sdk-pipe")["steps"] == ["docs"]
        client.pipelines.delete("sdk-pipe")
        client.kbs.delete("sdk-kb")
        assert "sdk-kb" not in {kb["name"] for kb in client.kbs.list()}
