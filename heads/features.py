"""What heads read: pooled vectors as a matrix, per-residue arrays as a lazy, indexable view.

Per-residue data of a whole dataset may not fit in memory (12,000 proteins of 350 residues
at 1,280 dimensions are 10 GB in fp16), so heads get a view that reads arrays from the cache
batch by batch. Tests and notebooks can wrap in-memory arrays the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from embedcache.sequences import sequence_key
from embedcache.store import EmbeddingCache

log = logging.getLogger(__name__)


def require_residues(cache: EmbeddingCache, who: str) -> None:
    """Refuse a cache made with ``--store pooled`` for a head (or command) that reads residues."""
    if getattr(cache, "store", "both") == "pooled":
        raise ValueError(
            f"{cache.path}: was made with --store pooled and holds pooled vectors only, but {who} reads "
            "per-residue embeddings; extract the proteins again with --store both (or per-residue) into another "
            "cache, or use a head that reads pooled vectors (logreg, lightgbm)"
        )


class Residues:
    """Per-residue arrays of some proteins; ``view[index_array]`` is a view of a subset."""

    lengths: np.ndarray
    dim: int

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index) -> Residues:
        return self.take(np.asarray(index))

    def take(self, index: np.ndarray) -> Residues:
        raise NotImplementedError

    def read(self, index: Sequence[int]) -> list[np.ndarray]:
        raise NotImplementedError


class ArrayResidues(Residues):
    def __init__(self, arrays: Sequence[np.ndarray]):
        self.arrays = list(arrays)
        self.lengths = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.dim = int(self.arrays[0].shape[1]) if self.arrays else 0

    def take(self, index):
        return ArrayResidues([self.arrays[i] for i in index])

    def read(self, index):
        return [self.arrays[i] for i in index]


class CachedResidues(Residues):
    """Per-residue arrays of some rows of a cache, read when asked for."""

    def __init__(self, cache: EmbeddingCache, rows: np.ndarray, layer: int | None = None):
        require_residues(cache, "this head")
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.layer = layer
        self.lengths = cache.n_residues_rows(self.rows)
        self.dim = cache.embed_dim

    def take(self, index):
        view = CachedResidues.__new__(CachedResidues)
        view.cache, view.layer, view.dim = self.cache, self.layer, self.dim
        view.rows = self.rows[index]
        view.lengths = self.lengths[index]
        return view

    def read(self, index):
        return self.cache.per_residue_rows(self.rows[np.asarray(index)], self.layer)


class FeatureSource:
    """What every kind of head reads for one labelled set's proteins, in the set's order.

    Frozen heads read a cache: proteins are found by the content key of their sequence, so
    the labelled file's IDs need not be the IDs the cache was built with (a DeepLocPro
    header's first word is ``ID|location|group|fold``, its ID the accession alone).
    Fine-tuning reads the sequences themselves, and needs no cache.
    """

    def __init__(self, cache: EmbeddingCache | None, sequences: Sequence[str], layer: int | None = None,
                 ids: Sequence[str] | None = None):
        rows = None
        if cache is not None:
            keys = [sequence_key(s) for s in sequences]
            found = cache.has_keys(keys)
            if not found.all():
                missing = [ids[i] if ids is not None else sequences[i][:20] for i in np.flatnonzero(~found).tolist()]
                skipped = (f"; {len(cache.skipped_ids)} of the cache's IDs were left out as longer than its "
                           f"max_length (--long skip): use --long truncate or chunk for them"
                           if cache.skipped_ids else "")
                raise ValueError(
                    f"{len(missing)} of {len(keys)} proteins have no embedding in {cache.path} "
                    f"(first: {', '.join(missing[:5])}){skipped}; otherwise run `embedcache extract` on the "
                    "dataset file into this cache first"
                )
            rows = cache.rows(keys=keys)
        self._init(cache, rows, layer, sequences)

    @classmethod
    def from_rows(cls, cache: EmbeddingCache, rows: np.ndarray, layer: int | None = None) -> FeatureSource:
        """Rows of a cache, with the sequences it stores."""
        source = cls.__new__(cls)
        source._init(cache, rows, layer, None)
        return source

    def _init(self, cache: EmbeddingCache | None, rows: np.ndarray | None, layer: int | None,
              sequences: Sequence[str] | None) -> None:
        self.cache = cache
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.layer = layer
        self._sequences = None if sequences is None else np.array(list(sequences), dtype=object)
        self._pooled: np.ndarray | None = None

    def _need_cache(self, kind: str) -> tuple[EmbeddingCache, np.ndarray]:
        """The cache and the proteins' rows in it (a source has rows exactly when it has a cache)."""
        if self.cache is None or self.rows is None:
            raise ValueError(f"heads that read {kind} embeddings need an embedding cache (--cache)")
        return self.cache, self.rows

    def pooled(self) -> np.ndarray:
        if self._pooled is None:
            cache, rows = self._need_cache("pooled")
            start = time.perf_counter()
            self._pooled = cache.pooled_rows(rows, self.layer).astype(np.float32)
            log.info("%s: read pooled embeddings of %d proteins in %.1f s", cache.path, len(rows),
                     time.perf_counter() - start)
        return self._pooled

    def residues(self) -> CachedResidues:
        cache, rows = self._need_cache("per-residue")
        require_residues(cache, "this head")
        return CachedResidues(cache, rows, self.layer)

    def sequences(self) -> np.ndarray:
        """The proteins' sequences as an object array (indexable by the splits' index arrays)."""
        if self._sequences is None:
            cache, rows = self._need_cache("sequence")
            self._sequences = np.array(cache.sequences_rows(rows.tolist()), dtype=object)
        return self._sequences

    def for_input(self, kind: str):
        if kind == "pooled":
            return self.pooled()
        if kind == "per_residue":
            return self.residues()
        if kind == "sequence":
            return self.sequences()
        raise ValueError(f"unknown head input {kind!r}")


def length_batches(lengths: np.ndarray, max_tokens: int, max_size: int, min_size: int = 1) -> list[np.ndarray]:
    """Indices grouped by similar length, each batch's padded size within ``max_tokens``.

    With ``min_size=2`` a batch of one protein joins its neighbour (batch norm needs two).
    """
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    current: list[int] = []
    widest = 0
    for i in order:
        n = int(lengths[i])
        if current and (max(widest, n) * (len(current) + 1) > max_tokens or len(current) >= max_size):
            batches.append(np.array(current))
            current, widest = [], 0
        current.append(i)
        widest = max(widest, n)
    if current:
        batches.append(np.array(current))
    if min_size > 1 and len(batches) > 1:
        merged: list[np.ndarray] = []
        for batch in batches:
            if merged and (len(batch) < min_size or len(merged[-1]) < min_size):
                merged[-1] = np.concatenate([merged[-1], batch])
            else:
                merged.append(batch)
        batches = merged
    return batches


def pad(arrays: list[np.ndarray], crop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(B, L, D) float32 and a (B, L) mask of real residues. ``crop`` keeps the N-terminal part."""
    lengths = [min(len(a), crop) if crop else len(a) for a in arrays]
    out = np.zeros((len(arrays), max(lengths), arrays[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(arrays), max(lengths)), dtype=bool)
    for row, (a, n) in enumerate(zip(arrays, lengths)):
        out[row, :n] = a[:n]
        mask[row, :n] = True
    return out, mask
