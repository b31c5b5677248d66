"""A dataset report: what a labelled set holds before any model is trained on it.

``describe(...)`` returns every number as a plain dict (what ``describe.json`` holds), so a
notebook can call it; ``write_report`` adds the figures and a self-contained ``describe.html``.

What it counts: proteins per class, per organism group and per fold (and class x fold, class x
group); identical sequences under several IDs and whether their labels agree; lengths; how many
proteins exceed the model's window and what truncation or chunking does to them; tokens per
protein with the special tokens, and their 95th percentile; residues outside the 20 standard
amino acids; and, against another set, the proteins both share (identical sequences, and with
MMseqs2 those above an identity threshold).

The window, long-sequence policy and special tokens come from a cache when one is given (its
recorded settings and backbone family), so a UniRep cache is described as UniRep, with no
window; without a cache the report assumes ESM-2 (1,022 residues, BOS and EOS).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embedcache.atomic import file_sha256
from embedcache.batching import chunk_windows
from embedcache.sequences import AMINO_ACIDS, InputError, read_sequences, sequence_key

from .datasets import LabeledSet, detect_kind, load_labeled

log = logging.getLogger(__name__)

KIND_TITLES = {"deeplocpro": "DeepLocPro", "deeploc1": "DeepLoc 1.0", "csv": "CSV"}
STANDARD = frozenset(AMINO_ACIDS)
# ESM-2's, for a report without a cache: 1024 positions in training, less BOS and EOS.
ESM2_WINDOW = 1022
ESM2_EXTRA_TOKENS = 2
DEFAULT_CHUNK_OVERLAP = 256  # embedcache extract's default --chunk-overlap
LISTED = 200  # longest list of IDs written per finding (the counts are always complete)


@dataclass
class ModelWindow:
    """What a backbone sees of a protein: its window and what is done with longer ones."""

    backbone: str  # e.g. "esm2_t6_8M_UR50D (ESM-2, esm2)" or "ESM-2 (assumed; no cache given)"
    family: str  # backbone family: esm2 | hf-esm2 | unirep
    window: int | None  # residues per forward pass; None: unbounded (a recurrent model)
    long_policy: str  # truncate | chunk | skip: what the cache did (or would do) with longer proteins
    chunk_overlap: int  # residues neighbouring windows share under chunking
    extra_tokens: int  # tokens a protein costs beyond its residues (BOS/EOS, UniRep's start token)
    supports_chunking: bool  # whether the family's windows can be stitched (not UniRep)
    source: str  # "cache" or "assumed"


def window_from_cache(provenance: dict, path: str | Path) -> ModelWindow:
    """The window, policy and special tokens a cache was built with, from its recorded settings."""
    from embedcache.backbones import FAMILIES, ESM2Backbone, UniRepBackbone

    family_name = str(provenance.get("family") or "")
    family = FAMILIES.get(family_name)
    if family is None:
        # Caches written before families were recorded hold fair-esm ESM-2 or UniRep.
        family = UniRepBackbone if str(provenance.get("architecture", "")).startswith("UniRep") else ESM2Backbone
        family_name = family.family
    raw = provenance.get("max_length")
    window = None if raw in (None, "none", "None") else int(raw)
    policy = str(provenance.get("long_policy") or "truncate")
    overlap = int(provenance.get("chunk_overlap") or 0)
    if policy == "chunk" and not overlap:
        overlap = DEFAULT_CHUNK_OVERLAP
    name = provenance.get("model") or "unnamed"
    architecture = provenance.get("architecture") or family_name
    return ModelWindow(f"{name} ({architecture})", family_name, window, policy,
                       overlap if policy == "chunk" else DEFAULT_CHUNK_OVERLAP,
                       int(family.extra_tokens), bool(family.supports_chunking), f"cache {path}")


def assumed_window() -> ModelWindow:
    return ModelWindow("ESM-2 (assumed: no cache given)", "esm2", ESM2_WINDOW, "truncate", DEFAULT_CHUNK_OVERLAP,
                       ESM2_EXTRA_TOKENS, True, "assumed")


def dataset_title(path: Path | str, kind: str) -> str:
    path = Path(path)
    return f"{KIND_TITLES.get(kind, kind)} ({path.name})" if kind != "csv" else path.name


# -- counts --------------------------------------------------------------------------------


def _table(member: np.ndarray, cols: list[Any], row_names: list[str], col_names: list[Any]) -> dict:
    """{class: {col: proteins}} with every class and column present, zeros included; ``member``
    (proteins x classes) says which classes each protein counts for (several when multi-label)."""
    out = {str(r): {str(c): 0 for c in col_names} for r in row_names}
    for row, c in zip(member, cols):
        for k in np.flatnonzero(row):
            out[str(row_names[k])][str(c)] += 1
    return out


def counts(data: LabeledSet) -> dict:
    """Proteins per class, group and fold, and the class x fold and class x group tables."""
    member = data.membership()
    out: dict[str, Any] = {
        "n": len(data),
        "classes": list(data.classes),
        "per_class": {c: int(n) for c, n in zip(data.classes, member.sum(0))},
    }
    if data.multilabel:
        per_protein = member.sum(1)
        out["multilabel"] = True
        out["labels_per_protein"] = {str(k): int((per_protein == k).sum())
                                     for k in range(1, int(per_protein.max()) + 1)}
        out["per_label_set"] = dict(Counter(data.label_names()).most_common())
    if data.groups is not None:
        groups = sorted({str(g) for g in data.groups})
        out["groups"] = groups
        out["per_group"] = {g: int(n) for g, n in sorted(Counter(str(g) for g in data.groups).items())}
        out["class_by_group"] = _table(member, [str(g) for g in data.groups], data.classes, groups)
    if data.folds is not None:
        folds = sorted({int(f) for f in data.folds})
        out["folds"] = folds
        out["per_fold"] = {str(f): int((data.folds == f).sum()) for f in folds}
        out["class_by_fold"] = _table(member, [int(f) for f in data.folds], data.classes, folds)
    return out


def duplicates(data: LabeledSet, listed: int = LISTED) -> dict:
    """Identical sequences under several IDs, whether their labels (and folds) agree.

    A repeated ID cannot occur here: the readers refuse a file that gives an ID twice, naming
    both places, since two labels for one protein would count it twice and could put it on
    both sides of a split.
    """
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, seq in enumerate(data.sequences):
        by_key[sequence_key(seq)].append(i)
    names = data.label_names()
    sets = []
    for members in by_key.values():
        if len(members) < 2:
            continue
        labels = sorted({names[i] for i in members})
        entry: dict[str, Any] = {
            "ids": [data.ids[i] for i in members],
            "labels": [names[i] for i in members],
            "labels_agree": len(labels) == 1,
            "length": len(data.sequences[members[0]]),
        }
        if data.folds is not None:
            folds = [int(data.folds[i]) for i in members]
            entry["folds"] = folds
            entry["same_fold"] = len(set(folds)) == 1
        sets.append(entry)
    sets.sort(key=lambda e: (e["labels_agree"], -len(e["ids"]), e["ids"][0]))
    out: dict[str, Any] = {
        "unique_sequences": len(by_key),
        "duplicate_sets": len(sets),
        "proteins_in_duplicate_sets": sum(len(e["ids"]) for e in sets),
        "redundant_proteins": len(data) - len(by_key),
        "sets_with_conflicting_labels": sum(not e["labels_agree"] for e in sets),
        "repeated_ids": 0,
        "repeated_ids_note": "the readers refuse a file that gives an ID twice (an error naming both lines), "
                             "so every ID here is unique; identical sequences under different IDs are allowed",
        "sets": sets[:listed],
        "sets_listed": min(len(sets), listed),
    }
    if data.folds is not None:
        out["sets_across_folds"] = sum(not e["same_fold"] for e in sets)
    return out


# -- lengths, windows, tokens, residues ----------------------------------------------------


def _summary(values: np.ndarray) -> dict:
    if not len(values):
        return {"n": 0}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"n": int(len(values)), "min": int(values.min()), "q1": float(q1), "median": float(median),
            "mean": float(values.mean()), "q3": float(q3), "max": int(values.max())}


def lengths(data: LabeledSet) -> dict:
    length = np.array([len(s) for s in data.sequences], dtype=np.int64)
    return {
        "all": _summary(length),
        "per_class": {c: _summary(length[member]) for c, member in zip(data.classes, data.membership().T)},
    }


def window_effects(data: LabeledSet, model: ModelWindow, listed: int = LISTED) -> dict:
    """Proteins over the window, and what truncation, chunking or skipping would do to them."""
    length = np.array([len(s) for s in data.sequences], dtype=np.int64)
    out: dict[str, Any] = {
        "backbone": model.backbone, "family": model.family, "window": model.window,
        "long_policy": model.long_policy, "chunk_overlap": model.chunk_overlap,
        "extra_tokens": model.extra_tokens, "source": model.source,
    }
    if model.window is None:
        out.update(over_window=0, note=f"{model.family} has no window: it reads every protein whole, "
                                       "so nothing is truncated or chunked")
        return out
    over = length > model.window
    names = data.label_names()
    lost = np.maximum(length - model.window, 0)
    windows = np.array([len(chunk_windows(int(n), model.window, model.chunk_overlap)) if n > model.window else 1
                        for n in length], dtype=np.int64)
    order = np.argsort(-length[over], kind="stable")
    over_index = np.flatnonzero(over)[order]
    out.update(
        over_window=int(over.sum()),
        over_window_fraction=float(over.mean()) if len(length) else 0.0,
        over_window_per_class={c: int(over[member].sum()) for c, member in zip(data.classes, data.membership().T)},
        truncation={
            "residues_lost": int(lost.sum()),
            "residues_total": int(length.sum()),
            "fraction_of_residues_lost": float(lost.sum() / max(int(length.sum()), 1)),
            "largest_loss": int(lost.max()) if len(lost) else 0,
            "median_loss_of_truncated": float(np.median(lost[over])) if over.any() else 0.0,
        },
        chunking={
            "supported": model.supports_chunking,
            "overlap": model.chunk_overlap,
            "windows_total": int(windows.sum()),
            "extra_windows": int((windows - 1).sum()),
            "most_windows": int(windows.max()) if len(windows) else 0,
        },
        over_window_ids=[{"id": data.ids[i], "label": names[i], "length": int(length[i]),
                          "residues_lost_truncated": int(lost[i]), "windows_chunked": int(windows[i])}
                         for i in over_index[:listed]],
    )
    if not model.supports_chunking:
        out["chunking"]["note"] = f"{model.family} cannot be chunked: its windows cannot be stitched together"
    return out


def tokens(data: LabeledSet, model: ModelWindow) -> dict:
    """Tokens per protein, special tokens included; p95 is the smallest count covering 95% of proteins."""
    count = np.array([len(s) + model.extra_tokens for s in data.sequences], dtype=np.int64)
    if not len(count):
        return {"extra_tokens": model.extra_tokens, "n": 0}
    # inverted_cdf: an observed count, the smallest with at least 95% of proteins at or below it.
    p95 = int(np.quantile(count, 0.95, method="inverted_cdf"))
    p50 = int(np.quantile(count, 0.5, method="inverted_cdf"))
    out = {
        "extra_tokens": model.extra_tokens,
        "n": int(len(count)),
        "median": p50,
        "p95": p95,
        "covered_by_p95": float((count <= p95).mean()),
        "max": int(count.max()),
        "total": int(count.sum()),
        "max_length_for_95_percent": p95,
    }
    if model.window is not None:
        limit = model.window + model.extra_tokens
        out["model_positions"] = limit
        out["covered_by_model_positions"] = float((count <= limit).mean())
    return out


def residues(data: LabeledSet, listed: int = LISTED) -> dict:
    """Residues outside the 20 standard amino acids (X, B, Z, J, U, O), per letter and per protein."""
    per_letter: Counter[str] = Counter()
    proteins: list[dict[str, Any]] = []
    names = data.label_names()
    for i, seq in enumerate(data.sequences):
        odd = Counter(ch for ch in seq if ch not in STANDARD)
        if odd:
            per_letter.update(odd)
            proteins.append({"id": data.ids[i], "label": names[i], "length": len(seq),
                             "nonstandard": sum(odd.values()), "letters": dict(sorted(odd.items()))})
    proteins.sort(key=lambda p: (-p["nonstandard"], p["id"]))
    per_protein = np.array([p["nonstandard"] for p in proteins], dtype=np.int64)
    return {
        "per_letter": dict(sorted(per_letter.items())),
        "total": int(sum(per_letter.values())),
        "proteins_with_any": len(proteins),
        "most_in_one_protein": int(per_protein.max()) if len(per_protein) else 0,
        "per_protein_histogram": {str(k): int(v) for k, v in sorted(Counter(per_protein.tolist()).items())},
        "proteins": proteins[:listed],
        "proteins_listed": min(len(proteins), listed),
    }


def cache_coverage(data: LabeledSet, cache: Any) -> dict:
    """How many of the set's sequences the cache holds (found by content, as the heads find them),
    and how many it stores shortened (truncated to its window)."""
    keys = [sequence_key(s) for s in data.sequences]
    present = cache.has_keys(keys)
    found = np.flatnonzero(present)
    stored = cache.n_residues_rows(cache.rows(keys=[keys[i] for i in found])) if len(found) else np.zeros(0)
    full = np.array([len(data.sequences[i]) for i in found], dtype=np.int64)
    missing = [data.ids[i] for i in np.flatnonzero(~present)]
    if missing:
        # The window and policy reported come from this cache: said aloud when it is not the set's.
        log.warning("%s: holds %d of the %d sequences (%d missing, e.g. %s)%s", getattr(cache, "path", "the cache"),
                    len(found), len(keys), len(missing), missing[0],
                    "; it is a cache of other proteins" if not len(found) else "")
    return {"in_cache": int(present.sum()), "missing": len(missing), "missing_ids": missing[:LISTED],
            "stored_truncated": int((stored < full).sum())}


# -- overlap with another set --------------------------------------------------------------


def read_other(
    path: Path | str, kind: str | None = None, **csv_options
) -> tuple[list[str], list[str], list[str] | None]:
    """IDs, sequences and (when the file has them) labels of the set to compare with.

    A labelled file is read as ``heads cv`` would; a plain FASTA or CSV without labels is read
    for its sequences alone.
    """
    try:
        other = load_labeled(path, kind, **csv_options)
        return other.ids, other.sequences, other.label_names()
    except InputError as err:
        if "ID" in err.problem and "twice" in err.problem:
            raise
        log.info("%s: not a labelled set (%s); reading its sequences only", path, err.problem)
    records = read_sequences(path, id_col=csv_options.get("id_col"), seq_col=csv_options.get("seq_col"))
    return [r.id for r in records], [r.sequence for r in records], None


def exact_overlap(data: LabeledSet, other_ids: list[str], other_seqs: list[str],
                  other_labels: list[str] | None, listed: int = LISTED) -> dict:
    """Proteins of ``data`` whose sequence (by content key) also occurs in the other set."""
    where: dict[str, list[int]] = defaultdict(list)
    for j, seq in enumerate(other_seqs):
        where[sequence_key(seq)].append(j)
    pairs = []
    names = data.label_names()
    for i, seq in enumerate(data.sequences):
        hits = where.get(sequence_key(seq))
        if not hits:
            continue
        entry: dict[str, Any] = {"id": data.ids[i], "label": names[i],
                                 "other_ids": [other_ids[j] for j in hits]}
        if other_labels is not None:
            entry["other_labels"] = [other_labels[j] for j in hits]
            entry["labels_agree"] = all(other_labels[j] == entry["label"] for j in hits)
        pairs.append(entry)
    keys = {sequence_key(s) for s in data.sequences}
    out: dict[str, Any] = {
        "proteins": len(pairs),
        "other_proteins": sum(1 for s in other_seqs if sequence_key(s) in keys),
        "ids": [p["id"] for p in pairs[:listed]],
        "pairs": pairs[:listed],
    }
    if other_labels is not None:
        out["labels_disagree"] = sum(not p["labels_agree"] for p in pairs)
    return out


# MMseqs2 refuses a database from which it cannot extract a k-mer ("Maybe the sequences length
# is less than 14 residues"); shorter sequences are left out of the search, counted, and still
# found when identical.
MMSEQS_MIN_LENGTH = 14


def _write_fasta(path: Path, seqs: list[str]) -> int:
    """Sequences long enough for MMseqs2, named by their row (an ID may hold characters it cuts at)."""
    rows = [(i, s) for i, s in enumerate(seqs) if len(s) >= MMSEQS_MIN_LENGTH]
    path.write_text("".join(f">{i}\n{s}\n" for i, s in rows))
    return len(rows)


def mmseqs_overlap(data: LabeledSet, other_ids: list[str], other_seqs: list[str], identity: float = 0.3,
                   threads: int = 2, listed: int = LISTED) -> dict:
    """Proteins of ``data`` with a hit in the other set at ``identity`` or more (MMseqs2 easy-search).

    Identity is identical residues over the shorter sequence's length, as the homology folds
    use it (GraphPart's 'shortest' denominator); MMseqs2's own E-value cut (1e-3) applies first.
    Its output goes to this module's log (debug), never to standard output.
    """
    binary = shutil.which("mmseqs")
    if binary is None:
        return {"available": False, "note": "MMseqs2 (mmseqs) is not installed; Debian: apt-get install mmseqs2"}
    with tempfile.TemporaryDirectory(prefix="describe_mmseqs_") as tmp:
        tmpdir = Path(tmp)
        query, target, result = tmpdir / "query.fasta", tmpdir / "target.fasta", tmpdir / "hits.m8"
        searched = (_write_fasta(query, data.sequences), _write_fasta(target, other_seqs))
        command = [binary, "easy-search", str(query), str(target), str(result), str(tmpdir / "work"),
                   "--format-output", "query,target,nident,qlen,tlen,fident,alnlen,evalue",
                   # -a: without the backtrace MMseqs2 14 reports nident as 0
                   "-a", "--threads", str(threads), "-v", "1"]
        rows: list[str] = []
        if all(searched):
            log.info("MMseqs2: %d query proteins against %d (identity >= %.2f)", searched[0], searched[1], identity)
            proc = subprocess.run(command, capture_output=True, text=True, cwd=tmpdir)
            for line in (proc.stdout + proc.stderr).splitlines():
                log.debug("mmseqs: %s", line)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                raise RuntimeError(f"mmseqs easy-search failed (exit {proc.returncode}): {' | '.join(tail)}")
            rows = result.read_text().splitlines() if result.exists() else []
    best: dict[int, tuple[float, int]] = {}
    hit_targets: set[int] = set()
    for row in rows:
        q, t, nident, qlen, tlen = row.split("\t")[:5]
        value = int(nident) / min(int(qlen), int(tlen))
        if value < identity:
            continue
        qi, ti = int(q), int(t)
        hit_targets.add(ti)
        if qi not in best or value > best[qi][0]:
            best[qi] = (value, ti)
    # Identical sequences are 100% identical whatever MMseqs2 finds: it misses short peptides,
    # whose best alignment cannot pass its E-value cut.
    where = {sequence_key(s): j for j, s in enumerate(other_seqs)}
    for i, seq in enumerate(data.sequences):
        j = where.get(sequence_key(seq))
        if j is not None:
            hit_targets.add(j)
            best[i] = (1.0, j)
    order = sorted(best, key=lambda i: (-best[i][0], data.ids[i]))
    names = data.label_names()
    return {
        "available": True,
        "identity": identity,
        "identity_definition": "identical residues / length of the shorter sequence (MMseqs2 easy-search, "
                               "E-value <= 1e-3; identical sequences always count)",
        "proteins": len(best),
        "other_proteins": len(hit_targets),
        "too_short_to_search": {"here": len(data) - searched[0], "there": len(other_ids) - searched[1],
                                "min_length": MMSEQS_MIN_LENGTH},
        "ids": [data.ids[i] for i in order[:listed]],
        "best_hits": [{"id": data.ids[i], "label": names[i],
                       "other_id": other_ids[best[i][1]], "identity": round(best[i][0], 4)} for i in order[:listed]],
    }


# -- the whole report ----------------------------------------------------------------------


def load(path: Path | str, kind: str | None = None, task: str = "location", **csv_options) -> tuple[LabeledSet, str]:
    """The labelled set as ``heads cv`` reads it, and the reader used."""
    kind = kind or detect_kind(path)
    return load_labeled(path, kind, task, **csv_options), kind


def _csv_options(id_col, seq_col, label_col, class_names, label_cols) -> dict:
    return {"id_col": id_col, "seq_col": seq_col, "label_col": label_col, "class_names": class_names,
            "label_cols": label_cols}


def describe(
    data_path: Path | str,
    *,
    kind: str | None = None,
    cache: Path | str | None = None,
    against: Path | str | None = None,
    identity: float = 0.3,
    threads: int = 2,
    id_col: str | None = None,
    seq_col: str | None = None,
    label_col: str = "label",
    class_names: dict[str, str] | None = None,
    label_cols: tuple[str, ...] | None = None,
    task: str = "location",
) -> dict:
    """Every number of the dataset report for a file, as a JSON-ready dict (``describe.json``)."""
    csv_options = _csv_options(id_col, seq_col, label_col, class_names, label_cols)
    data, kind = load(data_path, kind, task, **csv_options)
    return describe_data(data, data_path, kind, cache=cache, against=against, identity=identity, threads=threads,
                         csv_options=csv_options)


def describe_data(
    data: LabeledSet,
    data_path: Path | str,
    kind: str,
    *,
    cache: Path | str | None = None,
    against: Path | str | None = None,
    identity: float = 0.3,
    threads: int = 2,
    csv_options: dict | None = None,
) -> dict:
    """The report of a set already read from ``data_path`` (with reader ``kind``)."""
    if not len(data):
        raise InputError(data_path, "no proteins")
    if not 0 <= identity <= 1:
        raise ValueError(f"identity must be between 0 and 1, not {identity}")
    report: dict[str, Any] = {
        "dataset": dataset_title(data_path, kind),
        "data": {"path": str(Path(data_path).resolve()), "sha256": file_sha256(data_path), "kind": kind},
        "counts": counts(data),
        "duplicates": duplicates(data),
        "lengths": lengths(data),
    }
    if cache is not None:
        from embedcache.reader import EmbeddingCache

        with EmbeddingCache(cache) as opened:
            provenance = dict(opened.attrs)
            model = window_from_cache(provenance, cache)
            report["cache"] = {"path": str(Path(cache).resolve()), "format_version": opened.format_version,
                               "settings": {k: provenance.get(k) for k in
                                            ("model", "family", "architecture", "weights_sha256", "layers",
                                             "max_length", "long_policy", "chunk_overlap", "pooling", "dtype")},
                               **cache_coverage(data, opened)}
    else:
        model = assumed_window()
    report["window"] = window_effects(data, model)
    report["tokens"] = tokens(data, model)
    report["residues"] = residues(data)
    if against is not None:
        other_ids, other_seqs, other_labels = read_other(against, **(csv_options or {}))
        try:
            other_title = dataset_title(against, detect_kind(against))
        except InputError:
            other_title = Path(against).name
        report["against"] = {
            "path": str(Path(against).resolve()), "sha256": file_sha256(against), "dataset": other_title,
            "n": len(other_ids),
            "exact": exact_overlap(data, other_ids, other_seqs, other_labels),
            "homology": mmseqs_overlap(data, other_ids, other_seqs, identity, threads),
        }
    return report


# -- figures and the HTML page -------------------------------------------------------------


def _title(ax: Any, what: str, report: dict) -> None:
    ax.set_title(f"{what}\n{report['dataset']} · n = {report['counts']['n']:,}", loc="left")


def _class_colours(n: int) -> list[Any]:
    """Distinct colours for ``n`` stacked classes: the house palette up to its size, tab20 beyond."""
    from .figstyle import COLOURS, pyplot

    if n <= len(COLOURS):
        return list(COLOURS[:n])
    cmap = pyplot().get_cmap("tab20")
    return [cmap(k % 20) for k in range(n)]


def _log_axis(values: np.ndarray) -> bool:
    """A log axis only where the values span more than a factor of 20."""
    return bool(len(values)) and values.max() > 20 * max(values.min(), 1)


def figures(data: LabeledSet, report: dict, out: Path) -> list[Any]:
    """The report's figures, each saved as SVG and PNG; returns figstyle.Figure records."""
    from .figstyle import Figure, colour, pyplot, save_figure

    plt = pyplot()
    made: list[Figure] = []
    classes = list(data.classes)
    member = data.membership()
    length = np.array([len(s) for s in data.sequences], dtype=np.int64)
    window = report["window"]
    n_classes = len(classes)

    # Class balance: one bar per class, split by organism group where the data has groups.
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * n_classes + 1.4))
    y = np.arange(n_classes)
    counts_ = report["counts"]
    if "class_by_group" in counts_:
        left = np.zeros(n_classes)
        for k, group in enumerate(counts_["groups"]):
            values = np.array([counts_["class_by_group"][c][group] for c in classes])
            ax.barh(y, values, left=left, color=colour(k), label=group, height=0.7)
            left += values
        ax.legend(title="organism group", frameon=False, loc="lower right")
    else:
        ax.barh(y, [counts_["per_class"][c] for c in classes], color=colour(0), height=0.7)
    total = counts_["n"]
    for k, c in enumerate(classes):
        value = counts_["per_class"][c]
        ax.text(value, k, f" {value:,} ({100 * value / total:.1f}%)", va="center", fontsize=8)
    ax.set_yticks(y, classes)
    ax.invert_yaxis()
    ax.set_xlabel("proteins")
    ax.set_xlim(0, max(counts_["per_class"].values()) * 1.3)
    _title(ax, "Proteins per label" if data.multilabel else "Proteins per class", report)
    made.append(Figure(save_figure(fig, out / "class_balance")["png"].with_suffix(""), "Counts",
                       ("Proteins per label (a protein counts for each of its labels)" if data.multilabel
                        else "Proteins per class")
                       + (", split by organism group." if "class_by_group" in counts_ else ".")
                       + " Percentages are of all proteins."))

    # Per-fold class counts.
    if "class_by_fold" in counts_:
        folds = [str(f) for f in counts_["folds"]]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(folds) + 3), 3.6))
        bottom = np.zeros(len(folds))
        stacked = _class_colours(n_classes)
        for k, c in enumerate(classes):
            values = np.array([counts_["class_by_fold"][c][f] for f in folds])
            ax.bar(np.arange(len(folds)), values, bottom=bottom, color=stacked[k], label=c, width=0.7)
            bottom += values
        for x, value in enumerate(bottom):
            ax.text(x, value, f"{int(value):,}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(np.arange(len(folds)), folds)
        ax.set_xlabel("fold")
        ax.set_ylabel("proteins")
        ax.set_ylim(0, bottom.max() * 1.12)
        ax.legend(title="class", frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
        _title(ax, "Class counts per fold", report)
        made.append(Figure(save_figure(fig, out / "fold_class_counts")["png"].with_suffix(""), "Counts",
                           "Proteins per fold (as the file assigns them), stacked by class; fold sizes on top."))

    # Length histogram per class: one panel per class, shared x axis on a log scale.
    limit = window.get("window")
    log_length = _log_axis(length)
    scale = "log scale" if log_length else "linear scale"
    edges = (np.logspace(np.log10(max(length.min(), 1)), np.log10(length.max() + 1), 40) if log_length
             else np.linspace(length.min(), length.max() + 1, 40))
    cols = 2 if n_classes > 1 else 1
    rows = int(np.ceil(n_classes / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7.2, 1.7 * rows + 0.9), sharex=True, squeeze=False)
    for k, c in enumerate(classes):
        ax = axes[k // cols][k % cols]
        # One colour: each panel is named, and repeating colours past eight classes would mislead.
        ax.hist(length[member[:, k]], bins=edges, color=colour(0))
        if log_length:
            ax.set_xscale("log")
        if limit is not None:
            ax.axvline(limit, color="#444", linestyle="--", linewidth=0.9,
                       label=f"model window ({limit:,} residues)" if k == 0 else None)
        ax.set_title(f"{c} (n = {int(member[:, k].sum()):,})", fontsize=9, loc="left")
        ax.set_ylabel("proteins")
    if limit is not None:
        fig.legend(frameon=False, loc="upper right", bbox_to_anchor=(0.99, 0.99))
    for k in range(n_classes, rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(f"length (residues, {scale})")
    if rows > 1 and n_classes % cols:
        axes[-2][-1].xaxis.set_tick_params(labelbottom=True)
        axes[-2][-1].set_xlabel("length (residues, log scale)")
    window_note = f"; dashed: the model window ({limit:,} residues)" if limit is not None else ""
    fig.suptitle(f"Sequence length per class\n{report['dataset']} · n = {total:,}", x=0.02, ha="left", fontsize=10)
    fig.tight_layout()
    made.append(Figure(save_figure(fig, out / "length_histogram")["png"].with_suffix(""), "Lengths",
                       f"Length histograms per class, 40 {'log-spaced ' if log_length else ''}bins{window_note}."))

    # Box plot of lengths per class.
    fig, ax = plt.subplots(figsize=(max(4.8, 0.8 * n_classes + 2), 3.8))
    parts = ax.boxplot([length[member[:, k]] for k in range(n_classes)], showfliers=True,
                       flierprops={"marker": ".", "markersize": 2, "alpha": 0.5}, patch_artist=True,
                       medianprops={"color": "black"})
    for box in parts["boxes"]:
        box.set_facecolor(colour(0))
        box.set_alpha(0.6)
    if log_length:
        ax.set_yscale("log")
    ax.set_xticks(range(1, n_classes + 1),
                  [f"{c}\n(n = {int(member[:, k].sum()):,})" for k, c in enumerate(classes)],
                  rotation=30 if n_classes > 4 else 0, ha="right" if n_classes > 4 else "center")
    if limit is not None:
        ax.axhline(limit, color="#444", linestyle="--", linewidth=0.9, label=f"model window ({limit:,})")
        ax.legend(frameon=False, loc="upper right")
    ax.set_ylabel(f"length (residues, {scale})")
    _title(ax, "Sequence length per class", report)
    made.append(Figure(save_figure(fig, out / "length_boxplot")["png"].with_suffix(""), "Lengths",
                       "Length per class: boxes span the quartiles, the line is the median, whiskers reach 1.5 "
                       "interquartile ranges, dots are the proteins beyond them."))

    # Tokens per protein with the 95th percentile.
    tok = report["tokens"]
    count = length + tok["extra_tokens"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    # Log-spaced bins on a log axis, as for lengths: a few very long proteins would otherwise
    # squeeze every other one into a handful of bars.
    log_count = _log_axis(count)
    ax.hist(count, color=colour(0), bins=np.logspace(np.log10(count.min()), np.log10(count.max() + 1), 50)
            if log_count else 50)
    if log_count:
        ax.set_xscale("log")
    ax.axvline(tok["p95"], color=colour(5), linewidth=1.3,
               label=f"95th percentile: {tok['p95']:,} tokens ({100 * tok['covered_by_p95']:.1f}% at or below)")
    if "model_positions" in tok:
        ax.axvline(tok["model_positions"], color="#444", linestyle="--", linewidth=0.9,
                   label=f"model positions: {tok['model_positions']:,} "
                         f"({100 * tok['covered_by_model_positions']:.1f}% fit)")
    ax.set_xlabel(f"tokens per protein (residues + {tok['extra_tokens']} special{'; log scale' if log_count else ''})")
    ax.set_ylabel("proteins")
    # Below the axes: inside them it would cover bars wherever the mass of the distribution lies.
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(0, -0.2))
    _title(ax, "Tokens per protein", report)
    made.append(Figure(save_figure(fig, out / "tokens")["png"].with_suffix(""), "Tokens",
                       f"Tokens per protein including {tok['extra_tokens']} special token(s) "
                       f"({window['backbone']}); a max_length of {tok['p95']:,} covers 95% of the proteins."))
    return made


def _frame(table: dict, index_name: str) -> pd.DataFrame:
    frame = pd.DataFrame(table).T
    frame.insert(0, index_name, frame.index)
    frame["total"] = frame.drop(columns=[index_name]).sum(axis=1)
    totals = {index_name: "total", **{c: int(frame[c].sum()) for c in frame.columns if c != index_name}}
    return pd.concat([frame, pd.DataFrame([totals])], ignore_index=True)


HTML_ROWS = 50  # rows of a list shown in the page; describe.json holds up to LISTED


def html_sections(report: dict, made: list[Any]) -> list[str]:
    from .htmlpage import bullets, image, section
    from .htmlpage import table as full_table

    def table(frame: pd.DataFrame, float_format: str = "{:.3f}") -> str:
        if len(frame) <= HTML_ROWS:
            return full_table(frame, float_format)
        return (full_table(frame.head(HTML_ROWS), float_format)
                + f"<p>First {HTML_ROWS} of {len(frame):,} rows listed; describe.json lists up to {LISTED}.</p>")

    def figs(name: str) -> list[str]:
        return [image(f.png, f.caption, f.caption) for f in made if f.section == name]

    c, d, w, t, r = report["counts"], report["duplicates"], report["window"], report["tokens"], report["residues"]
    out = []
    per_class = pd.DataFrame({"class": list(c["per_class"]), "proteins": list(c["per_class"].values())})
    per_class["share"] = per_class["proteins"] / c["n"]
    parts = [table(per_class)]
    if c.get("multilabel"):
        per = ", ".join(f"{k} label{'s' if k != '1' else ''}: {n:,}" for k, n in c["labels_per_protein"].items())
        parts += [f"<p>Multi-label: a protein counts once for each of its labels, so the shares add up to more "
                  f"than 1. Proteins by number of labels: {per}.</p>", "<h3>Label sets</h3>",
                  table(pd.DataFrame({"labels": list(c["per_label_set"]),
                                      "proteins": list(c["per_label_set"].values())}))]
    if "class_by_group" in c:
        parts += ["<h3>Class × organism group</h3>", table(_frame(c["class_by_group"], "class"))]
    if "class_by_fold" in c:
        parts += ["<h3>Class × fold</h3>", table(_frame(c["class_by_fold"], "class"))]
    out.append(section("Counts", *parts, *figs("Counts")))

    notes = [f"{d['unique_sequences']:,} unique sequences among {c['n']:,} proteins; "
             f"{d['duplicate_sets']:,} sequences occur under more than one ID "
             f"({d['proteins_in_duplicate_sets']:,} proteins, {d['redundant_proteins']:,} redundant).",
             f"{d['sets_with_conflicting_labels']:,} of them carry different labels.",
             f"Repeated IDs: {d['repeated_ids_note']}."]
    if "sets_across_folds" in d:
        notes.append(f"{d['sets_across_folds']:,} identical sequences sit in different folds (a leak between "
                     "training and test).")
    parts = [bullets(notes)]
    if d["sets"]:
        rows = pd.DataFrame([{"IDs": ", ".join(e["ids"]), "labels": ", ".join(e["labels"]),
                              "labels agree": "yes" if e["labels_agree"] else "NO", "length": e["length"],
                              **({"folds": ", ".join(map(str, e["folds"]))} if "folds" in e else {})}
                             for e in d["sets"]])
        parts.append(table(rows))
    out.append(section("Duplicate sequences", *parts))

    stats = pd.DataFrame([{"class": k, **v} for k, v in report["lengths"]["per_class"].items()]
                         + [{"class": "all", **report["lengths"]["all"]}])
    out.append(section("Lengths", table(stats, "{:.1f}"), *figs("Lengths")))

    if w["window"] is None:
        notes = [f"Backbone: {w['backbone']} ({w['source']}).", w["note"] + "."]
        parts = [bullets(notes)]
    else:
        tr, ch = w["truncation"], w["chunking"]
        notes = [f"Backbone: {w['backbone']} ({w['source']}); window {w['window']:,} residues, long proteins: "
                 f"{w['long_policy']}.",
                 f"{w['over_window']:,} proteins ({100 * w['over_window_fraction']:.1f}%) are longer than the window.",
                 f"Truncation keeps the first {w['window']:,} residues: {tr['residues_lost']:,} of "
                 f"{tr['residues_total']:,} residues lost ({100 * tr['fraction_of_residues_lost']:.2f}%), "
                 f"at most {tr['largest_loss']:,} from one protein.",
                 (f"Chunking (windows overlapping by {ch['overlap']} residues): {ch['windows_total']:,} windows "
                  f"for {c['n']:,} proteins, {ch['extra_windows']:,} more than one each; at most "
                  f"{ch['most_windows']} for one protein." if ch["supported"] else ch.get("note", "") + ".")]
        parts = [bullets(notes)]
        if w["over_window"]:
            per = pd.DataFrame({"class": list(w["over_window_per_class"]),
                                "over the window": list(w["over_window_per_class"].values())})
            parts += [table(per), "<h3>Proteins over the window</h3>", table(pd.DataFrame(w["over_window_ids"]))]
    if "cache" in report:
        cache = report["cache"]
        parts.append(bullets([f"Cache {cache['path']} (format version {cache['format_version']}): holds "
                              f"{cache['in_cache']:,} of the {c['n']:,} sequences (found by content), "
                              f"{cache['stored_truncated']:,} of them stored truncated; "
                              f"{cache['missing']:,} missing."]))
    out.append(section("Model window", *parts))

    notes = [f"Tokens per protein include {t['extra_tokens']} special token(s).",
             f"Median {t['median']:,}, 95th percentile {t['p95']:,} ({100 * t['covered_by_p95']:.1f}% of proteins "
             f"at or below: a max_length of {t['p95']:,} covers 95%), longest {t['max']:,}."]
    out.append(section("Tokens", bullets(notes), *figs("Tokens")))

    notes = [f"{r['total']:,} residues outside the 20 standard amino acids in {r['proteins_with_any']:,} proteins"
             + (f" ({', '.join(f'{k}: {v:,}' for k, v in r['per_letter'].items())})" if r["per_letter"] else "")
             + f"; at most {r['most_in_one_protein']:,} in one protein."]
    parts = [bullets(notes)]
    if r["proteins"]:
        parts.append(table(pd.DataFrame([{**{k: v for k, v in p.items() if k != "letters"},
                                          "letters": ", ".join(f"{a}: {n}" for a, n in p["letters"].items())}
                                         for p in r["proteins"]])))
    out.append(section("Unknown and ambiguous residues", *parts))

    if "against" in report:
        a = report["against"]
        ex, hom = a["exact"], a["homology"]
        notes = [f"Compared with {a['dataset']} ({a['n']:,} proteins, sha256 {a['sha256'][:16]}…).",
                 f"Identical sequences: {ex['proteins']:,} of {c['n']:,} proteins here "
                 f"({ex['other_proteins']:,} proteins there)"
                 + (f"; {ex['labels_disagree']:,} with a different label there." if "labels_disagree" in ex
                    else ".")]
        if hom.get("available"):
            notes.append(f"At {100 * hom['identity']:.0f}% identity or more ({hom['identity_definition']}): "
                         f"{hom['proteins']:,} proteins here, {hom['other_proteins']:,} there.")
        else:
            notes.append(hom["note"] + ".")
        parts = [bullets(notes)]
        if ex["pairs"]:
            parts += ["<h3>Identical sequences</h3>",
                      table(pd.DataFrame([{"id": p["id"], "label": p["label"], "there": ", ".join(p["other_ids"]),
                                           **({"label there": ", ".join(p["other_labels"])}
                                              if "other_labels" in p else {})} for p in ex["pairs"]]))]
        if hom.get("best_hits"):
            parts += [f"<h3>Best hit at {100 * hom['identity']:.0f}% identity or more</h3>",
                      table(pd.DataFrame(hom["best_hits"]))]
        out.append(section("Overlap", *parts))

    prov = [f"Data: {report['data']['path']} (sha256 {report['data']['sha256']}, read as {report['data']['kind']})"]
    if "cache" in report:
        prov.append("Cache settings: " + ", ".join(f"{k}={v}" for k, v in report["cache"]["settings"].items()))
    prov.append(f"Lists in this page and in describe.json stop at {LISTED} entries; counts are complete.")
    out.append(section("Provenance", bullets(prov)))
    return out


def _replace_report(out: Path, stage: Path, stems: list[str]) -> None:
    """Move a staged report into ``out``: the index (describe.html, describe.json) out first and in last."""
    import json

    previous: list[str] = []
    with contextlib.suppress(OSError, ValueError, AttributeError):
        previous = [str(s) for s in json.loads((out / "describe.json").read_text()).get("figures", [])]
    for name in ("describe.html", "describe.json"):
        (out / name).unlink(missing_ok=True)
    # Figures of an earlier report that this one does not make would sit beside it unexplained.
    for stem in set(previous) - set(stems):
        if "/" not in stem and not stem.startswith("."):
            for suffix in (".svg", ".png"):
                (out / (stem + suffix)).unlink(missing_ok=True)
    index = ("describe.json", "describe.html")
    for path in sorted(stage.iterdir(), key=lambda p: (p.name in index, index.index(p.name) if p.name in index else 0)):
        os.replace(path, out / path.name)


def write_report(out: Path | str, data_path: Path | str, *, kind: str | None = None,
                 cache: Path | str | None = None, against: Path | str | None = None, identity: float = 0.3,
                 threads: int = 2, id_col: str | None = None, seq_col: str | None = None, label_col: str = "label",
                 class_names: dict[str, str] | None = None, command: str | None = None,
                 label_cols: tuple[str, ...] | None = None, task: str = "location") -> dict:
    """describe.json, the figures and describe.html in ``out``; returns the report dict."""
    from embedcache import __version__
    from embedcache.atomic import write_json

    from .htmlpage import write_page

    csv_options = _csv_options(id_col, seq_col, label_col, class_names, label_cols)
    data, kind = load(data_path, kind, task, **csv_options)
    report = describe_data(data, data_path, kind, cache=cache, against=against, identity=identity,
                           threads=threads, csv_options=csv_options)
    report["provenance"] = {"embedcache_version": __version__, "command": command}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; choose a directory for --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".describe-", dir=out))
    except OSError as err:
        raise ValueError(f"{out}: cannot write the report there ({err.strerror or err})") from None
    # Everything is written beside the report first and moved into place only once all of it
    # exists: a full disk or a kill leaves the previous report (or none), never a mix of two.
    try:
        made = figures(data, report, stage)
        report["figures"] = [f.stem.name for f in made]
        write_json(stage / "describe.json", report)
        subtitle = (f"{report['counts']['n']:,} proteins · {len(data.classes)} classes · window: "
                    f"{report['window']['backbone']}")
        sections = html_sections(report, made)
        if command:
            from .htmlpage import escape

            sections.append(f"<pre>{escape(command)}</pre>")
        write_page(stage / "describe.html", f"Dataset report: {report['dataset']}", subtitle, sections)
        _replace_report(out, stage, report["figures"])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("dataset report written to %s", out)
    return report
