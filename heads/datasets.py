"""Labelled protein sets: DeepLocPro FASTA, UniProt-style CSV, DeepLoc 1.0 FASTA.

Every reader validates sequences with the embedding cache's own reader, so a dataset and
its cache always agree on IDs and residues. Class names are sorted, so the label numbering
is the same whatever order the file lists proteins in, and it is saved with every run.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embedcache.sequences import InputError, detect_format, load_table, load_text, read_fasta, table_records

log = logging.getLogger(__name__)

DATASET_KINDS = ("deeplocpro", "csv", "deeploc1")


@dataclass
class LabeledSet:
    name: str
    ids: list[str]
    sequences: list[str]
    labels: np.ndarray  # int, index into classes
    classes: list[str]
    groups: np.ndarray | None = None  # organism group (DeepLocPro) or None
    folds: np.ndarray | None = None  # int fold per protein when the file gives one, -1 = left out
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def subset(self, index: np.ndarray) -> LabeledSet:
        index = np.asarray(index)
        return LabeledSet(
            self.name,
            [self.ids[i] for i in index],
            [self.sequences[i] for i in index],
            self.labels[index],
            self.classes,
            None if self.groups is None else self.groups[index],
            None if self.folds is None else self.folds[index],
            {k: v[index] for k, v in self.extra.items()},
        )

    def require_folds(self) -> np.ndarray:
        """The folds, for a set that must have them by now."""
        if self.folds is None:
            raise ValueError(f"{self.name}: no folds assigned")
        return self.folds

    def with_folds(self, folds: np.ndarray) -> LabeledSet:
        """A copy with these folds; proteins with fold -1 are dropped."""
        keep = np.flatnonzero(np.asarray(folds) >= 0)
        out = self.subset(np.arange(len(self)))
        out.folds = np.asarray(folds, dtype=np.int64)
        return out.subset(keep)

    def frame(self) -> pd.DataFrame:
        data: dict[str, Any] = {"id": self.ids, "label": [self.classes[i] for i in self.labels]}
        if self.groups is not None:
            data["group"] = self.groups
        if self.folds is not None:
            data["fold"] = self.folds
        return pd.DataFrame(data)


def _encode(names: list[str], classes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    classes = classes or sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), classes


def read_deeplocpro(path: Path | str) -> LabeledSet:
    """Headers ``>ID|location|organism_group|fold`` (the fold is optional)."""
    path = Path(path)
    records = read_fasta(path)
    locations, groups, folds = [], [], []
    for number, rec in enumerate(records, 1):
        fields = rec.header.split()[0].split("|")
        if len(fields) not in (3, 4):
            raise InputError(path, f"header {rec.header!r} is not ID|location|group[|fold]", f"record {number}")
        locations.append(fields[1])
        groups.append(fields[2])
        if len(fields) == 4:
            if not re.fullmatch(r"[0-9]+", fields[3]) or len(fields[3]) > 9:
                raise InputError(path, f"fold {fields[3]!r} is not a whole number", f"record {number}")
            folds.append(int(fields[3]))
    if folds and len(folds) != len(records):
        raise InputError(path, "some headers give a fold and some do not")
    labels, classes = _encode(locations)
    ids = [rec.header.split()[0].split("|")[0] for rec in records]
    return _dedupe_ids(LabeledSet(path.stem, ids, [r.sequence for r in records], labels, classes,
                                  np.array(groups), np.array(folds, dtype=np.int64) if folds else None),
                       path, [r.line for r in records], unit="lines")


def read_labeled_csv(
    path: Path | str,
    id_col: str | None = None,
    seq_col: str | None = None,
    label_col: str = "label",
    class_names: dict[str, str] | None = None,
    fold_col: str | None = None,
) -> LabeledSet:
    """One protein per row; labels from ``label_col``, renamed through ``class_names`` if given."""
    path = Path(path)
    # One read serves records and labels, with the same decompression, decoding and delimiter.
    table = load_table(path)
    records = table_records(table, id_col, seq_col)
    if label_col not in table.columns:
        raise InputError(path, f"no label column {label_col!r}; columns are {table.columns}")
    raw = [v.strip() for v in table.column(label_col)]
    for row, value in zip(table.lines, raw):
        if not value:
            raise InputError(path, f"empty label in column {label_col!r}", f"row {row}")
        if value.lower() in _MISSING:
            raise InputError(path, f"label {value!r} in column {label_col!r} marks a missing value; drop the row "
                                   "or give it a class", f"row {row}")
    if class_names:
        found = sorted(set(raw))
        unmatched = [k for k in class_names if k not in set(raw)]
        if unmatched:
            shown = ", ".join(map(repr, found[:20])) + (f" and {len(found) - 20} more" if len(found) > 20 else "")
            raise InputError(path, f"--class-names {', '.join(map(repr, unmatched))} match no value of column "
                                   f"{label_col!r}; its values are {shown}")
        empty = [k for k, v in class_names.items() if not str(v).strip()]
        if empty:
            raise InputError(path, f"--class-names gives {', '.join(map(repr, empty))} an empty name")
        merged: dict[str, list[str]] = {}
        for key, name in class_names.items():
            merged.setdefault(name, []).append(key)
        for name, keys in merged.items():
            if len(keys) > 1:
                log.warning("%s: --class-names maps %s to one class %r", path, ", ".join(map(repr, keys)), name)
    names = [class_names.get(v, v) for v in raw] if class_names else raw
    labels, classes = _encode(names)
    folds = None
    if fold_col is not None:
        index = table.column_index(fold_col, "--fold-col")
        folds = np.array([_fold_value(row[index], path, fold_col, line) for row, line in zip(table.rows, table.lines)],
                         dtype=np.int64)
    return _dedupe_ids(LabeledSet(path.stem, [r.id for r in records], [r.sequence for r in records], labels,
                                  classes, None, folds), path, table.lines)


def _fold_value(value: str, path: Path, column: str, row: int) -> int:
    """A fold as a whole number (negative: the protein is left out); "3.0" as spreadsheets write it is 3."""
    text = value.strip()
    match = re.fullmatch(r"([+-]?\d+)(?:\.0*)?", text)
    if match is None:
        raise InputError(path, f"fold {value!r} in column {column!r} is not a whole number (folds are 0, 1, 2, ...; "
                               "a negative fold leaves the protein out)", f"row {row}")
    fold = int(match.group(1))
    if abs(fold) >= 2**31:
        raise InputError(path, f"fold {value!r} in column {column!r} is out of range", f"row {row}")
    return fold


def _dedupe_ids(data: LabeledSet, path: Path, rows: list[int], unit: str = "rows") -> LabeledSet:
    """Refuse an ID given twice: two labels (or folds) for one protein would count it twice and
    could put it on both sides of a split."""
    seen: dict[str, int] = {}
    for i, ident in enumerate(data.ids):
        if ident in seen:
            raise InputError(path, f"ID {ident!r} appears twice ({unit} {rows[seen[ident]]} and {rows[i]})")
        seen[ident] = i
    return data


# Spellings of a missing value that pandas and spreadsheets write into a label column.
_MISSING = {"nan", "na", "n/a", "none", "null", "<na>", "?"}


_DEEPLOC1 = re.compile(r"^(\S+)\s+([A-Za-z._/]+(?:-[A-Za-z._/]+)*)-([MSU])(?:\s|$)")


def read_deeploc1(path: Path | str) -> LabeledSet:
    """Headers ``>ACC Location-M/S/U [test|new_test_set]`` (DeepLoc 1.0 as Light Attention ships it).

    23 proteins carry two locations (``Cytoplasm-Nucleus-U``); like Light Attention's loader,
    whose setHARD results are the published ones, the first is the label. The full annotation
    is kept in ``extra['annotation']``.
    """
    path = Path(path)
    records = read_fasta(path)
    locations, membrane, annotation = [], [], []
    for number, rec in enumerate(records, 1):
        match = _DEEPLOC1.match(rec.header)
        if match is None:
            raise InputError(path, f"header {rec.header!r} is not 'ACC Location-M|S|U'", f"record {number}")
        locations.append(match.group(2).split("-")[0])
        membrane.append(match.group(3))
        annotation.append(match.group(2))
    labels, classes = _encode(locations)
    return _dedupe_ids(LabeledSet(path.stem, [r.id for r in records], [r.sequence for r in records], labels,
                                  classes, extra={"membrane": np.array(membrane),
                                                  "annotation": np.array(annotation)}),
                       path, [r.line for r in records], unit="lines")


def detect_kind(path: Path | str) -> str:
    """From the content, as the sequence reader decides it (compression, encoding, delimiter)."""
    path = Path(path)
    if detect_format(path) != "fasta":
        return "csv"
    for line in load_text(path).text.split("\n"):
        line = line.lstrip(" \t")
        if line.startswith(">"):
            first = line[1:].split()[0] if line[1:].strip() else ""
            if first.count("|") in (2, 3):
                return "deeplocpro"
            if _DEEPLOC1.match(line[1:]):
                return "deeploc1"
            break
    raise InputError(path, "cannot tell the dataset format; headers should be 'ID|location|group|fold' "
                           "(DeepLocPro) or 'ACC Location-M/S/U' (DeepLoc 1.0), or give a CSV")


def load_labeled(path: Path | str, kind: str | None = None, **csv_options) -> LabeledSet:
    """Read a labelled set; ``csv_options`` (id_col, seq_col, label_col, class_names) apply to CSV only."""
    kind = kind or detect_kind(path)
    if kind == "deeplocpro":
        return read_deeplocpro(path)
    if kind == "deeploc1":
        return read_deeploc1(path)
    if kind == "csv":
        return read_labeled_csv(path, **csv_options)
    raise ValueError(f"dataset kind must be one of {DATASET_KINDS}, not {kind!r}")


def load_labeled_files(paths: Path | str | Sequence[Path | str], kind: str | None = None, fold_col: str | None = None,
                       **csv_options) -> LabeledSet:
    """One labelled set from one file or several (merged, as :func:`merge` does), each read alike.

    ``fold_col`` names a CSV/TSV column holding each protein's fold; other formats refuse it.
    """
    path_list = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if fold_col is not None:
        for path in path_list:
            found = kind or detect_kind(path)
            if found != "csv":
                raise ValueError(f"--fold-col reads a column of a CSV/TSV; {path} is {found} (a DeepLocPro FASTA "
                                 "gives its folds in its headers: --folds file)")
        csv_options = {**csv_options, "fold_col": fold_col}
    sets = [load_labeled(p, kind, **csv_options) for p in path_list]
    return sets[0] if len(sets) == 1 else merge(sets, "+".join(s.name for s in sets))


def merge(sets: list[LabeledSet], name: str) -> LabeledSet:
    """Several files as one set (e.g. DeepLoc 1.0 validation + test), classes united.

    Folds are kept when every set has them; an ID in two sets is an error.
    """
    ids = [i for s in sets for i in s.ids]
    twice = [i for i, n in Counter(ids).items() if n > 1]
    if twice:
        raise ValueError(f"IDs appear in more than one of {', '.join(s.name for s in sets)}: {', '.join(twice[:5])}")
    classes = sorted(set().union(*(s.classes for s in sets)))
    labels, classes = _encode([s.classes[i] for s in sets for i in s.labels], classes)
    extra_keys = set.intersection(*(set(s.extra) for s in sets)) if sets else set()
    return LabeledSet(
        name,
        ids,
        [q for s in sets for q in s.sequences],
        labels,
        classes,
        np.concatenate([s.groups for s in sets]) if all(s.groups is not None for s in sets) else None,
        np.concatenate([s.folds for s in sets]) if all(s.folds is not None for s in sets) else None,
        {k: np.concatenate([s.extra[k] for s in sets]) for k in extra_keys},
    )
