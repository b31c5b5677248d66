"""From unique sequences to a plan of work: long-sequence policy, windows and token-budget batches.

A *work item* is the unit of crash-safe progress: its results are written together or not
at all. Ordinary sequences are grouped greedily, longest first, into items whose padded size
(longest sequence plus BOS/EOS, times the count) stays within the token budget, so a GPU
that runs out of memory does so on the first batches. A chunked long sequence is an item of
its own, its overlapping windows run in as many forward passes as the budget needs.

The plan is a pure function of the sequences' keys and lengths, the budget and the policy
(anything with an entry's ``key``, ``length``, ``status`` and ``n_residues`` is planned the
same way, so the sequences themselves can wait on disk), and of nothing that happened
before: an interrupted run that is started again plans the same items for what is left,
so its results equal those of a run that was never interrupted.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

LONG_POLICIES = ("truncate", "chunk", "skip")


class Status(IntEnum):
    """How a sequence's stored residues relate to the sequence (stored per sequence)."""

    FULL = 0
    TRUNCATED = 1  # only the first max_length residues were embedded and stored
    CHUNKED = 2  # embedded in overlapping windows, stitched back to full length
    SKIPPED = 3  # longer than max_length under --long skip: not embedded


@dataclass(frozen=True)
class Entry:
    """One unique sequence to embed."""

    key: str
    sequence: str
    status: Status
    n_residues: int  # residues stored: the full length, or max_length when truncated

    @property
    def length(self) -> int:
        return len(self.sequence)


@dataclass
class WorkItem:
    entries: list[Entry]
    # (entry index, start, stop): residue ranges the model sees, longest first
    windows: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def n_residues(self) -> int:
        return sum(e.n_residues for e in self.entries)


def classify(key: str, sequence: str, max_length: int | None, policy: str) -> Entry:
    return Entry(key, sequence, *classify_length(len(sequence), max_length, policy))


def classify_length(length: int, max_length: int | None, policy: str) -> tuple[Status, int]:
    """(status, residues stored) of a sequence of ``length`` residues: what :func:`classify` decides."""
    if policy not in LONG_POLICIES:
        raise ValueError(f"long-sequence policy must be one of {LONG_POLICIES}, not {policy!r}")
    if max_length is None or length <= max_length:
        return Status.FULL, length
    if policy == "truncate":
        return Status.TRUNCATED, max_length
    if policy == "chunk":
        return Status.CHUNKED, length
    return Status.SKIPPED, 0


def chunk_windows(length: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of ``window`` residues, neighbours sharing at least ``overlap``, covering [0, length).

    The last window is aligned to the end so that every window is full-size (full context).
    """
    if not 0 <= overlap < window:
        raise ValueError(f"chunk overlap must be in [0, {window}), not {overlap}")
    if length <= window:
        return [(0, length)]
    step = window - overlap
    starts = list(range(0, length - window, step)) + [length - window]
    return [(s, s + window) for s in starts]


def stitch(pieces: list[tuple[int, int, np.ndarray]], length: int) -> np.ndarray:
    """Join per-window arrays; in each overlap the boundary sits at its middle.

    Each residue thus comes from the window in which it has the most context on both sides.
    """
    dim = pieces[0][2].shape[1]
    out = np.empty((length, dim), dtype=pieces[0][2].dtype)
    cut = 0
    for index, (start, stop, rows) in enumerate(pieces):
        end = stop if index == len(pieces) - 1 else (pieces[index + 1][0] + stop) // 2
        out[cut:end] = rows[cut - start : end - start]
        cut = end
    return out


def sort_key(entry: Entry) -> tuple[int, str]:
    """Longest first; ties broken by content key so the order never depends on input order."""
    return (-entry.length, entry.key)


def plan_work(
    entries: Iterable[Entry],
    toks_per_batch: int,
    extra_tokens: int,
    max_length: int | None,
    chunk_overlap: int,
) -> list[WorkItem]:
    """Group entries (skipped ones excluded) into work items in :func:`sort_key` order."""
    items: list[WorkItem] = []
    current: WorkItem | None = None
    widest = 0
    for entry in sorted((e for e in entries if e.status != Status.SKIPPED), key=sort_key):
        if entry.status == Status.CHUNKED:
            assert max_length is not None
            spans = chunk_windows(entry.length, max_length, chunk_overlap)
            items.append(WorkItem([entry], [(0, s, e) for s, e in spans]))
            current = None
            continue
        tokens = entry.n_residues + extra_tokens
        if current is None or max(widest, tokens) * (len(current.entries) + 1) > toks_per_batch:
            current = WorkItem([])
            items.append(current)
            widest = 0
        widest = max(widest, tokens)
        current.windows.append((len(current.entries), 0, entry.n_residues))
        current.entries.append(entry)
    return items


def sub_batches(lengths: list[int], toks_per_batch: int, extra_tokens: int) -> list[slice]:
    """Split consecutive windows (longest first) into forward passes within the budget."""
    batches = []
    start = 0
    while start < len(lengths):
        stop = start + 1
        widest = lengths[start] + extra_tokens
        while stop < len(lengths) and max(widest, lengths[stop] + extra_tokens) * (stop - start + 1) <= toks_per_batch:
            widest = max(widest, lengths[stop] + extra_tokens)
            stop += 1
        batches.append(slice(start, stop))
        start = stop
    return batches


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (I counted from 0) as (I, N); anything else is a ValueError saying what is expected."""
    head, sep, tail = str(text).strip().partition("/")
    try:
        index, count = int(head), int(tail)
    except ValueError:
        index = count = -1
    if not sep or count < 1 or not 0 <= index < count:
        raise ValueError(
            f"shard {text!r} is not of the form I/N with 0 <= I < N (I counts from 0: the shards of 4 are "
            "0/4, 1/4, 2/4 and 3/4)"
        )
    return index, count


def assign_shards(sizes: Mapping[str, int], n: int) -> dict[str, int]:
    """Content key -> shard in [0, n), balancing the residues of each shard.

    Longest-processing-time greedy: keys in order of decreasing size (ties by key) go to the
    shard with the fewest residues so far (ties by shard number). The result depends on the
    keys and sizes only, never on input order, so every shard of a run computes the same
    partition on its own. Sizes count at least 1, so that each of the first ``n`` keys opens
    a shard of its own and no shard is empty while there are at least ``n`` keys.
    """
    if n < 1:
        raise ValueError(f"the number of shards must be positive, not {n}")
    loads = [(0, shard) for shard in range(n)]
    heapq.heapify(loads)
    out: dict[str, int] = {}
    for key, size in sorted(sizes.items(), key=lambda item: (-max(int(item[1]), 1), item[0])):
        load, shard = heapq.heappop(loads)
        out[key] = shard
        heapq.heappush(loads, (load + max(int(size), 1), shard))
    return out
