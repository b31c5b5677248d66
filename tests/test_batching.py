from __future__ import annotations

import numpy as np
import pytest

from embedcache.batching import Status, chunk_windows, classify, plan_work, stitch, sub_batches


def _entries(lengths, max_length=None, policy="truncate"):
    return [classify(f"k{i:03d}", "A" * n, max_length, policy) for i, n in enumerate(lengths)]


@pytest.mark.parametrize(
    "length,window,overlap", [(100, 100, 10), (101, 100, 10), (1000, 100, 25), (2500, 1022, 256), (5, 3, 2)]
)
def test_chunk_windows_cover_with_overlap(length, window, overlap):
    spans = chunk_windows(length, window, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(stop - start == min(window, length) for start, stop in spans)
    for (s1, e1), (s2, _e2) in zip(spans, spans[1:]):
        assert s1 < s2 and e1 - s2 >= overlap


def test_stitch_takes_each_residue_from_one_window_in_order():
    length = 250
    spans = chunk_windows(length, 100, 30)
    # Each window's "embedding" of residue r is r itself, plus the window index in column 1.
    pieces = [(s, e, np.stack([np.arange(s, e), np.full(e - s, w)], axis=1).astype(float))
              for w, (s, e) in enumerate(spans)]
    out = stitch(pieces, length)
    assert np.array_equal(out[:, 0], np.arange(length))
    # The switch between neighbouring windows happens in the middle of their overlap.
    switches = np.flatnonzero(np.diff(out[:, 1])) + 1
    for (_s1, e1), (s2, _e2), cut in zip(spans, spans[1:], switches):
        assert cut == (s2 + e1) // 2


def test_policies():
    assert classify("a", "A" * 10, 10, "skip").status == Status.FULL
    t = classify("a", "A" * 11, 10, "truncate")
    assert (t.status, t.n_residues, t.length) == (Status.TRUNCATED, 10, 11)
    c = classify("a", "A" * 11, 10, "chunk")
    assert (c.status, c.n_residues) == (Status.CHUNKED, 11)
    assert classify("a", "A" * 11, 10, "skip").status == Status.SKIPPED
    with pytest.raises(ValueError, match="policy"):
        classify("a", "A", 10, "cut")


def test_plan_respects_budget_longest_first_counting_bos_eos():
    rng = np.random.default_rng(0)
    entries = _entries(rng.integers(1, 300, size=200).tolist())
    items = plan_work(entries, toks_per_batch=1024, extra_tokens=2, max_length=None, chunk_overlap=0)
    flat = [e for item in items for e in item.entries]
    assert sorted(e.key for e in flat) == sorted(e.key for e in entries)
    assert [e.length for e in flat] == sorted((e.length for e in entries), reverse=True)
    for item in items:
        padded = max(e.n_residues + 2 for e in item.entries) * len(item.entries)
        assert padded <= 1024
    # Greedy: adding the next item's first entry would have broken the budget.
    for a, b in zip(items, items[1:]):
        assert (len(a.entries) + 1) * max(e.n_residues + 2 for e in a.entries + b.entries[:1]) > 1024


def test_plan_of_the_rest_equals_the_rest_of_the_plan():
    """What resuming relies on: planning the undone entries reproduces the undone items."""
    rng = np.random.default_rng(1)
    entries = _entries(rng.integers(1, 400, size=120).tolist() + [1500, 2200], max_length=300, policy="chunk")
    items = plan_work(entries, 900, 2, 300, 50)
    for done in range(len(items)):
        finished = {e.key for item in items[:done] for e in item.entries}
        rest = plan_work([e for e in entries if e.key not in finished], 900, 2, 300, 50)
        assert [[e.key for e in i.entries] for i in rest] == [[e.key for e in i.entries] for i in items[done:]]


def test_chunked_and_skipped_entries_in_the_plan():
    entries = _entries([50, 700, 60], max_length=300, policy="chunk")
    items = plan_work(entries, 1024, 2, 300, 100)
    assert [len(i.entries) for i in items] == [1, 2]
    assert items[0].windows == [(0, s, e) for s, e in chunk_windows(700, 300, 100)]
    skipping = plan_work(_entries([50, 700], 300, "skip"), 1024, 2, 300, 0)
    assert [e.length for i in skipping for e in i.entries] == [50]


def test_sub_batches_within_budget():
    lengths = [300, 300, 300, 120, 100, 5]
    batches = sub_batches(lengths, 700, 2)
    assert [lengths[b] for b in batches] == [[300, 300], [300, 120], [100, 5]]
    assert sub_batches([2000], 100, 2) == [slice(0, 1)]  # a window larger than the budget runs alone
