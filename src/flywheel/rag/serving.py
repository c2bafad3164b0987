"""Answering with retrieval: the context a rag call gives its model, its citations, and the
retrieval span that joins the call's trace."""

from __future__ import annotations

import time
from typing import Any

from flywheel.guards.privacy import redact_content
from flywheel.rag.search import Retriever
from flywheel.tracing import TraceWriter, new_span_id

CONTEXT_INSTRUCTIONS = (
    "Answer the user's question from the numbered context passages below. Cite the passages "
    "you use by their number, like [1]. If the context does not contain the answer, say so."
)
# Characters of each hit that the retrieval span keeps (the trace must stay small).
SPAN_TEXT_CHARS = 300


def format_context(hits: list[dict[str, Any]]) -> str:
    """The system message for a rag call: instructions, then each hit as ``[n] (source)``."""
    if not hits:
        return f"{CONTEXT_INSTRUCTIONS}\n\nContext: (no passages found)"
    passages = "\n\n".join(
        f"[{i}] ({hit['source']})\n{hit['text']}" for i, hit in enumerate(hits, start=1)
    )
    return f"{CONTEXT_INSTRUCTIONS}\n\nContext:\n{passages}"


def citation(index: int, hit: dict[str, Any]) -> dict[str, Any]:
    """What an answer cites: the passage's number in the context, its document and chunk."""
    return {
        "index": index,
        "document_id": hit["document_id"],
        "source": hit["source"],
        "chunk_id": hit["chunk_id"],
        "start": hit["start"],
        "end": hit["end"],
        "score": hit["score"],
        "rank": hit["rank"],
        "text": hit["text"],
    }


class RagAnswering:
    """Retrieval for rag calls through the gateway, recorded as a ``rag.retrieve`` span."""

    def __init__(self, retriever: Retriever, writer: TraceWriter) -> None:
        self.retriever = retriever
        self.writer = writer

    async def retrieve(
        self,
        project_id: str,
        knowledge_base: str,
        question: str,
        options: dict[str, Any],
        *,
        trace_id: str,
        parent_id: str | None,
        api_key_id: str | None = None,
        capture: str = "full",
    ) -> dict[str, Any]:
        """Search, record the retrieval span (its query and hit texts as ``capture`` allows:
        ``full``, ``redacted`` or ``metadata``), and return the context, hits and citations."""
        started, perf = time.time(), time.perf_counter()
        span_id = new_span_id()
        error: str | None = None
        result: dict[str, Any] = {"hits": [], "index_version": None, "mode": None}
        try:
            result = await self.retriever.search(
                project_id,
                knowledge_base,
                question,
                top_k=options.get("top_k"),
                mode=options.get("mode"),
                filters=options.get("filters") or None,
            )
        except Exception as exc:
            error = str(exc)
            raise
        finally:
            span_input: Any = {"query": question, **options}
            span_output: Any = {
                "hits": [
                    {
                        "rank": hit["rank"],
                        "score": hit["score"],
                        "chunk_id": hit["chunk_id"],
                        "document_id": hit["document_id"],
                        "source": hit["source"],
                        "text": hit["text"][:SPAN_TEXT_CHARS],
                    }
                    for hit in result["hits"]
                ]
            }
            if capture == "metadata":
                span_input = {k: v for k, v in span_input.items() if k != "query"}
                for hit in span_output["hits"]:
                    hit.pop("text")
            elif capture == "redacted":
                span_input, span_output = redact_content(span_input), redact_content(span_output)
            self.writer.record(
                {
                    "trace_id": trace_id,
                    "span_id": span_id,
                    "parent_id": parent_id,
                    "name": f"retrieve {knowledge_base}",
                    "kind": "rag.retrieve",
                    "start_time": started,
                    "end_time": time.time(),
                    "latency_ms": (time.perf_counter() - perf) * 1000,
                    "status": "error" if error else "ok",
                    "status_code": 200,
                    "error": error,
                    "route": None,
                    "input": span_input,
                    "output": span_output,
                    "api_key_id": api_key_id,
                    "project_id": project_id,
                    "attributes": {
                        "flywheel.rag.knowledge_base": knowledge_base,
                        "flywheel.rag.index_version": result.get("index_version"),
                        "flywheel.rag.mode": result.get("mode"),
                    },
                }
            )
        hits = result["hits"]
        return {
            "context": format_context(hits),
            "hits": hits,
            "citations": [citation(i, hit) for i, hit in enumerate(hits, start=1)],
            "index_version": result.get("index_version"),
        }


__all__ = ["RagAnswering", "citation", "format_context"]
