"""Retrieval-augmented generation: knowledge bases (ingest, chunk, embed, index), search
(dense, BM25, hybrid), and answering with citations."""
