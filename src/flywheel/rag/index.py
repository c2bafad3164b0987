"""Search indexes for retrieval: dense vectors (faiss), keywords (BM25) and their fusion.

``VectorIndex`` answers cosine-similarity queries over chunk embeddings, ``Bm25Index`` answers
keyword queries over chunk texts, and ``reciprocal_rank_fusion`` merges their rankings into one
hybrid ranking. Both indexes map results back to the caller's int64 chunk ids, accept an
``allowed`` id set (the result of a metadata filter) and round-trip through ``to_bytes`` /
``from_bytes`` so that a knowledge base can keep them in an artifact store.
"""

from __future__ import annotations

import io
import json
import math
import struct
import tempfile
import zipfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import bm25s
import faiss
import numpy as np
import numpy.typing as npt

__all__ = ["Bm25Index", "Hit", "VectorIndex", "ranked_hits", "reciprocal_rank_fusion"]

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Hit:
    """One search result: the caller's chunk id, its score and its 1-based rank."""

    id: int
    score: float
    rank: int


def _as_id_array(ids: Sequence[int] | npt.ArrayLike) -> Int64Array:
    """Validate caller ids (1-D integers, no duplicates) and return them as int64."""
    array = np.asarray(ids)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"ids must be one-dimensional, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {array.dtype}")
    result = array.astype(np.int64, copy=False)
    if np.unique(result).size != result.size:
        raise ValueError("ids must be unique")
    return result


def _allowed_array(allowed: Collection[int]) -> Int64Array:
    """Turn an ``allowed`` filter (any collection of ints) into sorted unique int64 ids."""
    if isinstance(allowed, np.ndarray):
        array = allowed.astype(np.int64, copy=False).ravel()
    else:
        array = np.fromiter((int(item) for item in allowed), dtype=np.int64, count=len(allowed))
    return np.unique(array)


def _present(sorted_ids: Int64Array, candidates: Int64Array) -> npt.NDArray[np.bool_]:
    """Which of ``candidates`` occur in ``sorted_ids`` (ascending)."""
    if sorted_ids.size == 0:
        return np.zeros(candidates.shape, dtype=np.bool_)
    positions = np.minimum(np.searchsorted(sorted_ids, candidates), sorted_ids.size - 1)
    return np.asarray(sorted_ids[positions] == candidates, dtype=np.bool_)


def ranked_hits(pairs: list[tuple[float, int]]) -> list[Hit]:
    """Order (score, id) pairs by score descending, then id ascending, and number them."""
    pairs.sort(key=lambda pair: (-pair[0], pair[1]))
    return [Hit(id=hit_id, score=score, rank=rank) for rank, (score, hit_id) in enumerate(pairs, 1)]


# --------------------------------------------------------------------------------------------
# Dense vectors
# --------------------------------------------------------------------------------------------

_VECTOR_MAGIC: Final = b"FWVECIX1"
_BM25_MAGIC: Final = b"FWBM25X1"
# faiss's bundled type stubs lack some classes (SearchParametersHNSW): reach them untyped.
_faiss: Any = faiss
_HEADER_LENGTH: Final = struct.Struct("<I")

#: With an ``allowed`` filter that leaves at most this many ids, search brute-forces exactly those
#: vectors: a few thousand dot products cost less than walking an HNSW graph that mostly visits
#: filtered-out nodes, and the result is exact and always full.
FILTER_EXACT_LIMIT: Final = 8192
#: Filtered HNSW search multiplies efSearch by 1 / selectivity, up to this factor.
_MAX_FILTER_EF_BOOST: Final = 16
#: Filtered HNSW searches that come back short are retried this many times, efSearch x4 each.
_EF_RETRIES: Final = 2


class VectorIndex:
    """Cosine search over unit vectors (inner product on L2-normalised copies).

    Exact (faiss ``IndexFlatIP`` wrapped in ``IndexIDMap2``) when the index holds fewer than
    ``hnsw_threshold`` vectors, HNSW (``IndexHNSWFlat``, inner-product metric, in an
    ``IndexIDMap2``) from there up. Vectors are normalised at build and query time, so scores are
    cosine similarities whatever the caller's scaling; all-zero vectors stay zero (score 0).

    Results are ordered by score descending, then id ascending. Vectors are stored in id order,
    so an exact search also breaks ties *at the k-th place* in favour of the smaller id.

    Filtered search (``allowed``): ids not in the index are ignored; then

    1. if at most ``FILTER_EXACT_LIMIT`` ids remain, or the caller asks for all of them, those
       vectors are reconstructed and searched exactly (both kinds);
    2. otherwise an exact index scans everything with a faiss ``IDSelectorBatch``;
    3. an HNSW index searches with the selector and efSearch multiplied by
       ``min(size / allowed, 16)``; queries that still return fewer than ``min(k, allowed)``
       hits are retried twice with efSearch x4, and any still short are answered by exact
       search over the allowed vectors. So a search returns ``min(k, available)`` hits.
    """

    def __init__(
        self,
        index: Any,
        *,
        kind: str,
        hnsw_threshold: int,
        hnsw_m: int,
        ef_construction: int,
        ef_search: int,
    ) -> None:
        """Wrap a faiss ``IndexIDMap2`` whose ids were added in ascending order.

        Use ``build`` or ``from_bytes`` rather than calling this directly.
        """
        if kind not in ("exact", "hnsw"):
            raise ValueError(f"unknown vector index kind {kind!r}")
        ids = faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
        if ids.size > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            raise ValueError("vector index ids must be stored in ascending order")
        self._index = index
        self._inner = faiss.downcast_index(index.index)
        self._ids: Int64Array = ids
        self._kind = kind
        self._hnsw_threshold = hnsw_threshold
        self._hnsw_m = hnsw_m
        self._ef_construction = ef_construction
        self.ef_search = ef_search

    @classmethod
    def build(
        cls,
        ids: Sequence[int] | npt.ArrayLike,
        vectors: npt.ArrayLike,
        *,
        hnsw_threshold: int = 50_000,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
    ) -> VectorIndex:
        """Index ``vectors`` (n x d) under the caller's unique, non-negative int64 ``ids``.

        ``ef_search`` 128 is what reaches recall@10 >= 0.95 at 1M vectors (0.972 measured;
        64 gave 0.926: ``bench/rag/vector_search.py``).

        An empty index takes a (0, d) or (0, 0) array; it answers any query with no hits.
        """
        id_array = _as_id_array(ids)
        if id_array.size and int(id_array.min()) < 0:
            # faiss pads missing results with -1, so negative ids would be ambiguous.
            raise ValueError("vector index ids must be >= 0")
        matrix = np.asarray(vectors)
        # (0, 0) is accepted: an empty knowledge base may not know its dimension yet.
        if matrix.ndim != 2 or (matrix.shape[1] < 1 and matrix.shape[0] > 0):
            raise ValueError(f"vectors must be an n x d array, got shape {matrix.shape}")
        if matrix.shape[0] != id_array.size:
            raise ValueError(f"{id_array.size} ids for {matrix.shape[0]} vectors")
        if hnsw_threshold < 1 or hnsw_m < 2 or ef_construction < 1 or ef_search < 1:
            raise ValueError("hnsw_threshold, ef_construction, ef_search must be >= 1; hnsw_m >= 2")
        dim = int(matrix.shape[1])
        # Store vectors in id order: searchsorted maps ids to positions, and faiss breaks score
        # ties by position, i.e. by id.
        order = np.argsort(id_array, kind="stable")
        if bool(np.all(order == np.arange(order.size))):
            data = np.array(matrix, dtype=np.float32, order="C", copy=True)
        else:
            data = np.ascontiguousarray(matrix[order], dtype=np.float32)
        sorted_ids = np.ascontiguousarray(id_array[order])
        if not bool(np.isfinite(data).all()):
            raise ValueError("vectors must be finite")
        faiss.normalize_L2(data)
        kind = "hnsw" if id_array.size >= hnsw_threshold else "exact"
        inner: Any
        if kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = ef_construction
            inner.hnsw.efSearch = ef_search
        else:
            inner = faiss.IndexFlatIP(dim)
        index = faiss.IndexIDMap2(inner)
        if sorted_ids.size:
            index.add_with_ids(data, sorted_ids)
        return cls(
            index,
            kind=kind,
            hnsw_threshold=hnsw_threshold,
            hnsw_m=hnsw_m,
            ef_construction=ef_construction,
            ef_search=ef_search,
        )

    @property
    def kind(self) -> str:
        """``"exact"`` or ``"hnsw"``."""
        return self._kind

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self._index.d)

    @property
    def size(self) -> int:
        """Number of vectors held."""
        return int(self._ids.size)

    @property
    def ids(self) -> Int64Array:
        """The ids held, ascending (a copy)."""
        return self._ids.copy()

    @property
    def ef_search(self) -> int:
        """HNSW search breadth (before any filter boost); unused by an exact index."""
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if value < 1:
            raise ValueError("ef_search must be >= 1")
        self._ef_search = int(value)

    def __len__(self) -> int:
        return self.size

    def search(
        self, query: npt.ArrayLike, k: int, *, allowed: Collection[int] | None = None
    ) -> list[Hit] | list[list[Hit]]:
        """Top ``k`` by cosine for a (d,) query (a list of hits) or (q, d) queries (a list each).

        ``allowed`` restricts results to those ids. Never returns more hits than available;
        ``k <= 0`` gives no hits.
        """
        matrix = np.asarray(query)
        if matrix.ndim == 1:
            return self.search_batch(matrix[np.newaxis, :], k, allowed=allowed)[0]
        if matrix.ndim == 2:
            return self.search_batch(matrix, k, allowed=allowed)
        raise ValueError(f"query must be (d,) or (q, d), got shape {matrix.shape}")

    def search_batch(
        self, queries: npt.ArrayLike, k: int, *, allowed: Collection[int] | None = None
    ) -> list[list[Hit]]:
        """``search`` for a (q, d) array of queries, typed as one hit list per query."""
        matrix = np.asarray(queries)
        if matrix.ndim != 2:
            raise ValueError(f"queries must be (q, {self.dim}), got shape {matrix.shape}")
        count = int(matrix.shape[0])
        if k <= 0 or self.size == 0 or count == 0:
            return [[] for _ in range(count)]
        if matrix.shape[1] != self.dim:
            raise ValueError(f"queries must be (q, {self.dim}), got shape {matrix.shape}")
        data = np.array(matrix, dtype=np.float32, order="C", copy=True)
        if not bool(np.isfinite(data).all()):
            raise ValueError("queries must be finite")
        faiss.normalize_L2(data)

        candidates: Int64Array | None = None
        available = self.size
        if allowed is not None:
            requested = _allowed_array(allowed)
            candidates = requested[_present(self._ids, requested)]
            available = int(candidates.size)
            if available == 0:
                return [[] for _ in range(count)]
        want = min(k, available)

        if want == available or (candidates is not None and available <= FILTER_EXACT_LIMIT):
            scores, labels = self._exact_over(data, candidates, want)
        elif self._kind == "exact":
            scores, labels = self._faiss_search(data, want, candidates, ef=None)
        else:
            scores, labels = self._hnsw_search(data, want, candidates, available)
        return [
            ranked_hits(
                [
                    (float(score), int(label))
                    for score, label in zip(row_scores, row_labels, strict=True)
                    if label >= 0
                ]
            )
            for row_scores, row_labels in zip(scores, labels, strict=True)
        ]

    def _faiss_search(
        self, data: Float32Array, want: int, candidates: Int64Array | None, ef: int | None
    ) -> tuple[Float32Array, Int64Array]:
        params: Any = None
        # The selector must outlive the search call: keep it in a local.
        selector = None if candidates is None else faiss.IDSelectorBatch(candidates)
        if ef is not None:
            params = _faiss.SearchParametersHNSW()
            params.efSearch = ef
            if selector is not None:
                params.sel = selector
        elif selector is not None:
            params = faiss.SearchParameters()
            params.sel = selector
        scores, labels = self._index.search(data, want, params=params)
        return scores, labels

    def _hnsw_search(
        self, data: Float32Array, want: int, candidates: Int64Array | None, available: int
    ) -> tuple[Float32Array, Int64Array]:
        boost = min(math.ceil(self.size / available), _MAX_FILTER_EF_BOOST)
        ef = max(self._ef_search, want) * boost
        scores, labels = self._faiss_search(data, want, candidates, ef)
        short = np.flatnonzero((labels >= 0).sum(axis=1) < want)
        for _ in range(_EF_RETRIES):
            if short.size == 0:
                break
            ef *= 4
            retry_scores, retry_labels = self._faiss_search(data[short], want, candidates, ef)
            scores[short], labels[short] = retry_scores, retry_labels
            short = short[(retry_labels >= 0).sum(axis=1) < want]
        if short.size:
            exact_scores, exact_labels = self._exact_over(data[short], candidates, want)
            scores[short], labels[short] = exact_scores, exact_labels
        return scores, labels

    def _exact_over(
        self, data: Float32Array, candidates: Int64Array | None, want: int
    ) -> tuple[Float32Array, Int64Array]:
        """Exact search over the ``candidates`` (ascending ids; None = all) vectors."""
        if candidates is None:
            vectors = self._inner.reconstruct_n(0, self.size)
            labels_of = self._ids
        else:
            positions = np.searchsorted(self._ids, candidates)
            vectors = self._inner.reconstruct_batch(positions)
            labels_of = candidates
        flat = faiss.IndexFlatIP(self.dim)
        flat.add(vectors)
        scores, positions_found = flat.search(data, want)
        labels = np.where(positions_found >= 0, labels_of[np.maximum(positions_found, 0)], -1)
        return scores, labels.astype(np.int64, copy=False)

    def to_bytes(self) -> bytes:
        """Serialise (a small JSON header plus ``faiss.serialize_index``)."""
        header = json.dumps(
            {
                "kind": self._kind,
                "dim": self.dim,
                "hnsw_threshold": self._hnsw_threshold,
                "hnsw_m": self._hnsw_m,
                "ef_construction": self._ef_construction,
                "ef_search": self._ef_search,
            }
        ).encode()
        body = faiss.serialize_index(self._index)
        return b"".join((_VECTOR_MAGIC, _HEADER_LENGTH.pack(len(header)), header, body.data))

    @classmethod
    def from_bytes(cls, data: bytes) -> VectorIndex:
        """Load an index written by ``to_bytes``."""
        header, body_offset = _read_header(data, _VECTOR_MAGIC)
        body = np.frombuffer(data, dtype=np.uint8, offset=body_offset)
        index = faiss.deserialize_index(body)
        if not isinstance(index, faiss.IndexIDMap2) or int(index.d) != int(header["dim"]):
            raise ValueError("vector index bytes do not hold a matching faiss IndexIDMap2")
        return cls(
            index,
            kind=str(header["kind"]),
            hnsw_threshold=int(header["hnsw_threshold"]),
            hnsw_m=int(header["hnsw_m"]),
            ef_construction=int(header["ef_construction"]),
            ef_search=int(header["ef_search"]),
        )


def _read_header(data: bytes, magic: bytes) -> tuple[dict[str, Any], int]:
    """Check ``magic`` and return the JSON header and where the body starts."""
    start = len(magic) + _HEADER_LENGTH.size
    if len(data) < start or data[: len(magic)] != magic:
        raise ValueError("not a serialised Flywheel index (bad magic)")
    (length,) = _HEADER_LENGTH.unpack_from(data, len(magic))
    if len(data) < start + length:
        raise ValueError("truncated index header")
    header = json.loads(data[start : start + length])
    if not isinstance(header, dict):
        raise ValueError("index header is not a JSON object")
    return header, start + length


# --------------------------------------------------------------------------------------------
# BM25
# --------------------------------------------------------------------------------------------

_STEMMER_LANGUAGE: Final = "english"
_IDS_FILE: Final = "ids.npy"


def _stemmer(language: str | None) -> Any | None:
    """A PyStemmer stemmer for ``language``, or None when ``language`` is None."""
    if language is None:
        return None
    try:
        import Stemmer
    except ImportError as exc:
        raise RuntimeError(
            f"this BM25 index was built with the PyStemmer {language!r} stemmer, "
            "which is not installed"
        ) from exc
    return Stemmer.Stemmer(language)


def _default_stemmer_language() -> str | None:
    """Stem English only where PyStemmer is installed (it is an optional dependency)."""
    try:
        import Stemmer  # noqa: F401
    except ImportError:
        return None
    return _STEMMER_LANGUAGE


class Bm25Index:
    """Keyword search (bm25s, Lucene BM25 variant) over chunk texts, keyed by caller ids.

    Texts are tokenised by ``bm25s.tokenize`` (lower-cased words of two or more characters,
    ``stopwords`` removed, stemmed with PyStemmer's English stemmer only if that package is
    installed). Only documents with a score > 0 are hits, ordered by score descending, then id
    ascending.
    """

    def __init__(
        self,
        retriever: Any | None,
        ids: Int64Array,
        *,
        k1: float,
        b: float,
        stopwords: str | None,
        stemmer_language: str | None,
    ) -> None:
        """Wrap a bm25s retriever; ``ids[i]`` is the caller id of corpus document ``i``.

        Use ``build`` or ``from_bytes`` rather than calling this directly. ``retriever`` is None
        when the corpus has no searchable token at all.
        """
        self._retriever = retriever
        self._ids = ids
        self._k1 = k1
        self._b = b
        self._stopwords = stopwords
        self._stemmer_language = stemmer_language
        self._stemmer = _stemmer(stemmer_language)
        order = np.argsort(ids, kind="stable")
        self._sorted_ids: Int64Array = ids[order]
        self._sorted_positions = order

    @classmethod
    def build(
        cls,
        ids: Sequence[int],
        texts: Sequence[str],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        stopwords: str | None = "en",
    ) -> Bm25Index:
        """Index ``texts`` under the caller's unique ``ids``; ``stopwords`` is a bm25s language
        code (``"en"``) or None for no stopword removal."""
        id_array = _as_id_array(ids)
        if id_array.size != len(texts):
            raise ValueError(f"{id_array.size} ids for {len(texts)} texts")
        stemmer_language = _default_stemmer_language()
        index = cls(
            None, id_array, k1=k1, b=b, stopwords=stopwords, stemmer_language=stemmer_language
        )
        tokens = index._tokenize(list(texts))
        if any(tokens):
            retriever = bm25s.BM25(k1=k1, b=b)
            retriever.index(tokens, show_progress=False)
            index._retriever = retriever
        return index

    @property
    def size(self) -> int:
        """Number of documents indexed."""
        return int(self._ids.size)

    def __len__(self) -> int:
        return self.size

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        tokens: list[list[str]] = bm25s.tokenize(
            texts,
            stopwords=self._stopwords if self._stopwords is not None else [],
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=False,
        )
        return tokens

    def scores(self, query: str, *, allowed: Collection[int] | None = None) -> Float32Array:
        """BM25 score of every document, in build order (0 where filtered out or no match)."""
        if self._retriever is None:
            return np.zeros(self.size, dtype=np.float32)
        token_ids = self._retriever.get_tokens_ids(self._tokenize([query])[0])
        if not token_ids:
            return np.zeros(self.size, dtype=np.float32)
        mask = None
        if allowed is not None:
            mask = np.zeros(self.size, dtype=np.float32)
            requested = _allowed_array(allowed)
            present = _present(self._sorted_ids, requested)
            found = np.searchsorted(self._sorted_ids, requested[present])
            mask[self._sorted_positions[found]] = 1.0
        scores: Float32Array = self._retriever.get_scores_from_ids(token_ids, weight_mask=mask)
        return scores

    def search(self, query: str, k: int, *, allowed: Collection[int] | None = None) -> list[Hit]:
        """The ``k`` best-scoring documents (score > 0) among ``allowed`` ids (None = all)."""
        if k <= 0:
            return []
        scores = self.scores(query, allowed=allowed)
        matching = np.flatnonzero(scores > 0)
        if matching.size > k:
            # Keep everything tied with the k-th best so that ties are cut by id, not position.
            threshold = np.partition(scores[matching], matching.size - k)[matching.size - k]
            matching = matching[scores[matching] >= threshold]
        pairs = [(float(scores[i]), int(self._ids[i])) for i in matching]
        return ranked_hits(pairs)[:k]

    def to_bytes(self) -> bytes:
        """Serialise: ``bm25s`` ``save`` output plus the ids, packed into a zip archive."""
        header = json.dumps(
            {
                "k1": self._k1,
                "b": self._b,
                "stopwords": self._stopwords,
                "stemmer": self._stemmer_language,
                "empty": self._retriever is None,
            }
        ).encode()
        buffer = io.BytesIO()
        with tempfile.TemporaryDirectory() as directory:
            folder = Path(directory)
            if self._retriever is not None:
                self._retriever.save(folder, show_progress=False)
            np.save(folder / _IDS_FILE, self._ids, allow_pickle=False)
            with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(folder.iterdir()):
                    archive.write(path, arcname=path.name)
        return b"".join((_BM25_MAGIC, _HEADER_LENGTH.pack(len(header)), header, buffer.getvalue()))

    @classmethod
    def from_bytes(cls, data: bytes) -> Bm25Index:
        """Load an index written by ``to_bytes``."""
        header, body_offset = _read_header(data, _BM25_MAGIC)
        with tempfile.TemporaryDirectory() as directory:
            folder = Path(directory)
            with zipfile.ZipFile(io.BytesIO(data[body_offset:])) as archive:
                for name in archive.namelist():
                    # Write only plain file names: never let an archive path escape the folder.
                    if Path(name).name != name or name in ("", ".", ".."):
                        raise ValueError(f"unexpected entry {name!r} in BM25 index archive")
                    (folder / name).write_bytes(archive.read(name))
            ids = np.load(folder / _IDS_FILE, allow_pickle=False).astype(np.int64, copy=False)
            retriever = None
            if not header["empty"]:
                retriever = bm25s.BM25.load(folder, mmap=False, show_progress=False)
        stopwords = header["stopwords"]
        stemmer_language = header["stemmer"]
        return cls(
            retriever,
            ids,
            k1=float(header["k1"]),
            b=float(header["b"]),
            stopwords=None if stopwords is None else str(stopwords),
            stemmer_language=None if stemmer_language is None else str(stemmer_language),
        )


# --------------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------------


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Hit]],
    *,
    k: float = 60.0,
    weights: Sequence[float] | None = None,
    limit: int | None = None,
) -> list[Hit]:
    """Fuse rankings: ``score(id) = sum_i weights[i] / (k + rank_i(id))``.

    ``rank_i`` is the 1-based position in ranking ``i`` (list order, not ``Hit.rank``); an id
    repeated within one ranking counts once, at its best position. Ties are broken by the best
    position the id reached in any ranking, then by id. Returns Hits re-ranked 1..n, at most
    ``limit`` of them.
    """
    if k < 0 or not math.isfinite(k):
        raise ValueError("k must be a finite number >= 0")
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    if any(weight < 0 or not math.isfinite(weight) for weight in weights):
        raise ValueError("weights must be finite and >= 0")
    if limit is not None and limit <= 0:
        return []
    fused: dict[int, float] = {}
    best_rank: dict[int, int] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        seen: set[int] = set()
        for position, hit in enumerate(ranking, 1):
            if hit.id in seen:
                continue
            seen.add(hit.id)
            fused[hit.id] = fused.get(hit.id, 0.0) + weight / (k + position)
            best_rank[hit.id] = min(best_rank.get(hit.id, position), position)
    order = sorted(fused, key=lambda hit_id: (-fused[hit_id], best_rank[hit_id], hit_id))
    if limit is not None:
        order = order[:limit]
    return [Hit(id=hit_id, score=fused[hit_id], rank=rank) for rank, hit_id in enumerate(order, 1)]
