"""The SDK's knowledge bases (``client.kbs``) and pipelines (``client.pipelines``).

client.kbs.create("handbook", settings={"chunker": {"chunk_tokens": 200}})
client.kbs.upload("handbook", ["docs/intro.md", "docs/faq.pdf"])
client.kbs.upload("handbook", ["big.pdf"], background=True, wait=True)["result"]  # as a job
client.kbs.search("handbook", "How do I reset my password?", top_k=3)["hits"]
client.kbs.evaluate("handbook", items=[{"query": "reset password", "relevant": ["faq.pdf"]}])
client.pipelines.put("support", open("support.yaml").read())
client.pipelines.run("support", {"question": "Where is my order?"})["output"]
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from flywheel.sdk._paths import Transport as _Transport
from flywheel.sdk._paths import api_path
from flywheel.sdk._paths import clean as _clean
from flywheel.sdk.jobs import Jobs

_Dicts = list[dict[str, Any]]
Mode = Literal["dense", "bm25", "hybrid"]


def _background(background: bool) -> dict[str, Any] | None:
    return {"background": "true"} if background else None


class KnowledgeBases:
    """Create, fill, search and evaluate knowledge bases: ``client.kbs``."""

    def __init__(self, client: _Transport) -> None:
        self._client = client

    def list(self) -> _Dicts:
        """The project's knowledge bases with document and chunk counts."""
        data: _Dicts = self._client._request("GET", "/api/kbs")["data"]
        return data

    def get(self, name: str) -> dict[str, Any]:
        """One knowledge base with its settings and active index version."""
        found: dict[str, Any] = self._client._request("GET", api_path("api", "kbs", name))
        return found

    def create(
        self, name: str, *, description: str = "", settings: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A new knowledge base. ``settings``: ``chunker`` (strategy, chunk_tokens,
        overlap_tokens), ``embedder``, ``top_k``, ``mode``, ``rrf_k``, ``rerank``."""
        body = _clean({"name": name, "description": description, "settings": settings})
        created: dict[str, Any] = self._client._request("POST", "/api/kbs", json=body)
        return created

    def update(
        self,
        name: str,
        *,
        description: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Change settings (merged); a new chunker or embedder builds a new index version."""
        body = _clean({"description": description, "settings": settings})
        updated: dict[str, Any] = self._client._request(
            "PATCH", api_path("api", "kbs", name), json=body
        )
        return updated

    def delete(self, name: str) -> None:
        self._client._request("DELETE", api_path("api", "kbs", name))

    def upload(
        self,
        name: str,
        files: Iterable[str | Path | tuple[str, bytes]],
        *,
        metadata: dict[str, Any] | None = None,
        background: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Ingest files: paths, or ``(source name, bytes)`` pairs. Returns what was added,
        updated, left unchanged, skipped as a duplicate or could not be read.

        With ``background``, the server stores the files and a ``kb.ingest`` job ingests
        them: the job is returned, or with ``wait`` the job once it ended (its ``result`` is
        the report above)."""
        parts = []
        for item in files:
            if isinstance(item, tuple):
                source, data = item
            else:
                path = Path(item)
                source, data = path.name, path.read_bytes()
            kind = mimetypes.guess_type(source)[0] or "application/octet-stream"
            parts.append(("files", (source, data, kind)))
        form = {"metadata": json.dumps(metadata)} if metadata else None
        answer: dict[str, Any] = self._client._request(
            "POST",
            api_path("api", "kbs", name, "documents"),
            files=parts,
            data=form,
            params=_background(background),
        )
        return self._finish(answer, background, wait, timeout)

    def add_texts(
        self,
        name: str,
        documents: Sequence[dict[str, Any]],
        *,
        metadata: dict[str, Any] | None = None,
        background: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Ingest texts: ``[{"source": ..., "text": ..., "metadata": {...}}]``
        (``background``, ``wait``: as for :meth:`upload`)."""
        answer: dict[str, Any] = self._client._request(
            "POST",
            api_path("api", "kbs", name, "documents"),
            json=_clean({"documents": list(documents), "metadata": metadata}),
            params=_background(background),
        )
        return self._finish(answer, background, wait, timeout)

    def add_urls(
        self,
        name: str,
        urls: Sequence[str],
        *,
        metadata: dict[str, Any] | None = None,
        background: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Fetch and ingest URLs (the server refuses private addresses it does not allow);
        ``background``, ``wait``: as for :meth:`upload`."""
        answer: dict[str, Any] = self._client._request(
            "POST",
            api_path("api", "kbs", name, "urls"),
            json=_clean({"urls": list(urls), "metadata": metadata}),
            params=_background(background),
        )
        return self._finish(answer, background, wait, timeout)

    def _finish(
        self, answer: dict[str, Any], background: bool, wait: bool, timeout: float | None
    ) -> dict[str, Any]:
        """The report, the queued job, or (``wait``) that job once it ended."""
        if background and wait:
            return Jobs(self._client).wait(answer["id"], timeout=timeout)
        return answer

    def documents(
        self, name: str, *, q: str | None = None, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        """A page of documents: ``{"data": [...], "total": n}``."""
        page: dict[str, Any] = self._client._request(
            "GET",
            api_path("api", "kbs", name, "documents"),
            params=_clean({"q": q, "limit": limit, "offset": offset}),
        )
        return page

    def document(self, name: str, document_id: str) -> dict[str, Any]:
        """One document with its text and chunks."""
        found: dict[str, Any] = self._client._request(
            "GET", api_path("api", "kbs", name, "documents", document_id)
        )
        return found

    def delete_document(self, name: str, document_id: str) -> dict[str, Any]:
        done: dict[str, Any] = self._client._request(
            "DELETE", api_path("api", "kbs", name, "documents", document_id)
        )
        return done

    def search(
        self,
        name: str,
        query: str,
        *,
        top_k: int | None = None,
        mode: Mode | None = None,
        filters: dict[str, Any] | None = None,
        rrf_k: float | None = None,
        rerank: bool | None = None,
    ) -> dict[str, Any]:
        """``hits`` (chunk, document, score, rank), plus the ``dense`` and ``bm25`` rankings."""
        body = _clean(
            {
                "query": query,
                "top_k": top_k,
                "mode": mode,
                "filters": filters,
                "rrf_k": rrf_k,
                "rerank": rerank,
            }
        )
        found: dict[str, Any] = self._client._request(
            "POST", api_path("api", "kbs", name, "search"), json=body
        )
        return found

    def versions(self, name: str) -> _Dicts:
        """Index versions, newest first."""
        data: _Dicts = self._client._request("GET", api_path("api", "kbs", name, "versions"))[
            "data"
        ]
        return data

    def reindex(self, name: str) -> int | None:
        """Rebuild with the current settings; the active index version."""
        answer = self._client._request("POST", api_path("api", "kbs", name, "reindex"))
        version: int | None = answer["index_version"]
        return version

    def evaluate(
        self,
        name: str,
        *,
        items: Sequence[dict[str, Any]] | None = None,
        dataset: str | None = None,
        version: int | None = None,
        modes: Sequence[Mode] | None = None,
        ks: Sequence[int] | None = None,
        level: Literal["document", "chunk"] | None = None,
        filters: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Retrieval metrics per mode (``report["modes"]["hybrid"]["ndcg@10"]``) on labelled
        queries (``items``) or a dataset version."""
        body = _clean(
            {
                "items": list(items) if items is not None else None,
                "dataset": dataset,
                "version": version,
                "modes": list(modes) if modes is not None else None,
                "ks": list(ks) if ks is not None else None,
                "level": level,
                "filters": filters,
            }
        )
        report: dict[str, Any] = self._client._request(
            "POST", api_path("api", "kbs", name, "eval"), json=body
        )
        return report


class Pipelines:
    """Declarative pipelines: ``client.pipelines``."""

    def __init__(self, client: _Transport) -> None:
        self._client = client

    def list(self) -> _Dicts:
        data: _Dicts = self._client._request("GET", "/api/pipelines")["data"]
        return data

    def get(self, name: str) -> dict[str, Any]:
        """One pipeline with its YAML (``spec``)."""
        found: dict[str, Any] = self._client._request("GET", api_path("api", "pipelines", name))
        return found

    def put(self, name: str, spec: str) -> dict[str, Any]:
        """Create or replace ``name`` from its YAML."""
        saved: dict[str, Any] = self._client._request(
            "PUT",
            api_path("api", "pipelines", name),
            content=spec.encode(),
            headers={"content-type": "application/yaml"},
        )
        return saved

    def validate(self, spec: str) -> dict[str, Any]:
        """``{"valid": bool, "problems": [...]}`` without saving."""
        answer: dict[str, Any] = self._client._request(
            "POST",
            "/api/pipelines/validate",
            content=spec.encode(),
            headers={"content-type": "application/yaml"},
        )
        return answer

    def delete(self, name: str) -> None:
        self._client._request("DELETE", api_path("api", "pipelines", name))

    def run(self, name: str, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run with ``inputs``: ``status``, ``output``, ``error``, ``steps``, ``trace_id``."""
        answer: dict[str, Any] = self._client._request(
            "POST", api_path("api", "pipelines", name, "run"), json={"inputs": inputs or {}}
        )
        return answer


__all__ = ["KnowledgeBases", "Pipelines"]
