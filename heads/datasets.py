"""Labelled protein sets: DeepLocPro FASTA, UniProt-style CSV, DeepLoc 1.0 FASTA.

Every reader validates sequences with the embedding cache's own reader, so a dataset and
its cache always agree on IDs and residues. Class names are sorted, so the label numbering
is the same whatever order the file lists proteins in, and it is saved with every run.

A set is single-label (``labels`` holds one class index per protein) or multi-label
(``labels`` is an (n, L) 0/1 matrix over the L label names in ``classes``): a CSV with one
0/1 column per label (DeepLoc 2.0's layout, ``label_cols``), or DeepLoc 1.0 headers read as
location sets (``task="multilabel"``: ``Cytoplasm-Nucleus-U`` is both). DeepLoc 1.0 also
gives the membrane-bound/soluble task (``task="membrane"``; proteins marked U are left out).
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

from embedcache.sequences import (
    ID_COLUMNS,
    SEQ_COLUMNS,
    InputError,
    Table,
    detect_format,
    load_table,
    load_text,
    pick_column,
    read_fasta,
    table_records,
)

log = logging.getLogger(__name__)

DATASET_KINDS = ("deeplocpro", "csv", "deeploc1")
# What a file's labels mean: the location (one per protein), membrane-bound or soluble
# (DeepLoc 1.0's M/S), or the set of locations (DeepLoc 1.0 headers, or 0/1 columns of a CSV).
TASKS = ("location", "membrane", "multilabel")
MEMBRANE_CLASSES = {"M": "Membrane", "S": "Soluble"}


@dataclass
class LabeledSet:
    name: str
    ids: list[str]
    sequences: list[str]
    labels: np.ndarray  # int: index into classes (n,), or a 0/1 matrix over the labels in classes (n, L)
    classes: list[str]
    groups: np.ndarray | None = None  # organism group (DeepLocPro) or None
    folds: np.ndarray | None = None  # int fold per protein when the file gives one, -1 = left out
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def membership(self) -> np.ndarray:
        """(n, K) bool: protein i has class (or label) k."""
        if self.multilabel:
            return self.labels.astype(bool)
        return np.arange(self.n_classes)[None, :] == self.labels[:, None]

    def label_names(self) -> list[str]:
        """Each protein's class, or its labels joined by ";" (multi-label)."""
        if self.multilabel:
            return [";".join(c for c, on in zip(self.classes, row) if on) for row in self.labels]
        return [self.classes[i] for i in self.labels]

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
        data: dict[str, Any] = {"id": self.ids, "label": self.label_names()}
        if self.groups is not None:
            data["group"] = self.groups
        if self.folds is not None:
            data["fold"] = self.folds
        return pd.DataFrame(data)


def describe_labels(data: LabeledSet) -> str:
    """"6 classes", or "10 labels (multi-label, 1.18 labels per protein)"."""
    if data.multilabel:
        return f"{data.n_classes} labels (multi-label, {data.labels.sum(1).mean():.2f} labels per protein)"
    return f"{data.n_classes} classes"


def present_classes(data: LabeledSet) -> list[str]:
    """The classes (or labels) at least one protein of ``data`` has."""
    counts = data.labels.sum(0) if data.multilabel else np.bincount(data.labels, minlength=data.n_classes)
    return [c for c, n in zip(data.classes, counts) if n > 0]


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
    label_cols: tuple[str, ...] | list[str] | None = None,
) -> LabeledSet:
    """One protein per row; labels from ``label_col``, renamed through ``class_names`` if given.

    With ``label_cols`` the set is multi-label: one 0/1 column per label (``("auto",)``: every
    column other than the ID, sequence and fold columns whose values are all 0 or 1).
    """
    path = Path(path)
    # One read serves records and labels, with the same decompression, decoding and delimiter.
    table = load_table(path)
    records = table_records(table, id_col, seq_col)
    folds = None
    if fold_col is not None:
        index = table.column_index(fold_col, "--fold-col")
        folds = np.array([_fold_value(row[index], path, fold_col, line) for row, line in zip(table.rows, table.lines)],
                         dtype=np.int64)
    if label_cols:
        if class_names:
            raise InputError(path, "--class-names renames the values of --label-col; with --label-cols the "
                                   "column names are the labels")
        labels, classes = _label_matrix(table, path, label_cols, id_col, seq_col, fold_col)
        return _dedupe_ids(LabeledSet(path.stem, [r.id for r in records], [r.sequence for r in records], labels,
                                      classes, None, folds), path, table.lines)
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


# Spellings of 0 and 1 in a label column (pandas writes booleans and floats this way).
_BINARY = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


def _label_matrix(table: Table, path: Path, label_cols, id_col: str | None, seq_col: str | None,
                  fold_col: str | None) -> tuple[np.ndarray, list[str]]:
    """(n, L) 0/1 matrix and the L label names (sorted), from one 0/1 column per label."""
    cols = [c.strip() for c in label_cols if c.strip()]
    roles = {pick_column(table, id_col, ID_COLUMNS, "--id-col"): "ID", pick_column(table, seq_col, SEQ_COLUMNS,
                                                                                    "--seq-col"): "sequence"}
    if fold_col is not None:
        roles[table.column_index(fold_col)] = "fold"
    taken = set(roles)
    if cols == ["auto"]:
        index = [i for i, c in enumerate(table.columns) if i not in taken and table.rows
                 and all(row[i].strip().lower() in _BINARY for row in table.rows)]
        if len(index) < 2:
            raise InputError(path, f"--label-cols auto found {len(index)} column(s) of 0/1 values "
                                   f"({', '.join(table.columns[i] for i in index) or 'none'}); a multi-label set "
                                   "needs at least two (one label column: --label-col)")
    else:
        if len(cols) < 2:
            raise InputError(path, f"--label-cols names {len(cols)} column(s); a multi-label set needs at least two "
                                   "(one label column: --label-col)")
        index = [table.column_index(c, "--label-cols") for c in cols]
        twice = sorted({table.columns[i] for i in index if index.count(i) > 1})
        if twice:
            raise InputError(path, f"--label-cols names column {', '.join(map(repr, twice))} twice")
        other = [i for i in index if i in taken]
        if other:
            # A fold column of 0/1 would pass as labels: the labels would then be the folds.
            raise InputError(path, f"--label-cols names column {table.columns[other[0]]!r}, the {roles[other[0]]} "
                                   "column; label columns hold labels only")
    names = [table.columns[i].strip() for i in index]
    if len(set(names)) != len(names) or not all(names):
        raise InputError(path, f"label columns {names} need distinct, non-empty names")
    joined = [n for n in names if ";" in n]
    if joined:
        # Predicted sets are written as names joined by ";": such a name would read as two labels.
        raise InputError(path, f"label column {joined[0]!r} has ';' in its name; rename it")
    matrix = np.zeros((len(table.rows), len(index)), dtype=np.int64)
    for r, (row, fields) in enumerate(zip(table.lines, table.rows)):
        for j, i in enumerate(index):
            value = fields[i].strip()
            code = _BINARY.get(value.lower())
            if code is None:
                raise InputError(path, f"label column {names[j]!r} holds {value!r}; label columns hold 0 or 1",
                                 f"row {row}")
            matrix[r, j] = code
        if not matrix[r].any():
            raise InputError(path, f"no label set (every one of {', '.join(names)} is 0); give the protein a label "
                                   "or drop the row", f"row {row}")
    order = sorted(range(len(names)), key=lambda j: names[j])
    return matrix[:, order], [names[j] for j in order]


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


def read_deeploc1(path: Path | str, task: str = "location") -> LabeledSet:
    """Headers ``>ACC Location-M/S/U [test|new_test_set]`` (DeepLoc 1.0 as Light Attention ships it).

    23 proteins carry two locations (``Cytoplasm-Nucleus-U``). For ``task="location"``, like
    Light Attention's loader, whose setHARD results are the published ones, the first is the
    label; ``task="multilabel"`` gives each protein its set of locations; ``task="membrane"``
    labels Membrane (M) or Soluble (S) and leaves out the proteins marked U (unknown). The
    full annotation is kept in ``extra['annotation']``, the M/S/U mark in ``extra['membrane']``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
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
    if task == "multilabel":
        classes = sorted({name for a in annotation for name in a.split("-")})
        labels = np.array([[int(c in a.split("-")) for c in classes] for a in annotation], dtype=np.int64)
    elif task == "membrane":
        labels, classes = _encode([MEMBRANE_CLASSES.get(m, "") for m in membrane],
                                  sorted(MEMBRANE_CLASSES.values()) + [""])
        classes = classes[:-1]  # "" marks U: those proteins are dropped below
    else:
        labels, classes = _encode(locations)
    data = _dedupe_ids(LabeledSet(path.stem, [r.id for r in records], [r.sequence for r in records], labels,
                                  classes, extra={"membrane": np.array(membrane),
                                                  "annotation": np.array(annotation)}),
                       path, [r.line for r in records], unit="lines")
    if task == "membrane":
        known = np.flatnonzero(np.array(membrane) != "U")
        if len(known) == 0:
            raise InputError(path, "every protein is marked U (membrane association unknown); the membrane task "
                                   "needs proteins marked M or S")
        log.info("%s: membrane task: %d proteins marked U (unknown) left out, %d kept", path,
                 len(data) - len(known), len(known))
        data = data.subset(known)
    return data


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


def load_labeled(path: Path | str, kind: str | None = None, task: str = "location", **csv_options) -> LabeledSet:
    """Read a labelled set; ``csv_options`` (id_col, seq_col, label_col, class_names, fold_col,
    label_cols) apply to CSV only. ``task`` other than location needs DeepLoc 1.0 headers
    (a CSV is multi-label through ``label_cols``)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    kind = kind or detect_kind(path)
    if task != "location" and kind != "deeploc1":
        how = " (a CSV gives label sets as 0/1 columns: --label-cols)" if kind == "csv" else ""
        raise InputError(path, f"--task {task} reads DeepLoc 1.0 headers ('ACC Location-M/S/U'); this file is "
                               f"{kind}{how}")
    if kind != "csv" and csv_options.get("label_cols"):
        how = "; DeepLoc 1.0 headers give location sets with --task multilabel" if kind == "deeploc1" else ""
        raise InputError(path, f"--label-cols names the 0/1 columns of a CSV/TSV; this file is {kind}{how}")
    if kind == "deeplocpro":
        return read_deeplocpro(path)
    if kind == "deeploc1":
        return read_deeploc1(path, task)
    if kind == "csv":
        return read_labeled_csv(path, **csv_options)
    raise ValueError(f"dataset kind must be one of {DATASET_KINDS}, not {kind!r}")


def load_labeled_files(paths: Path | str | Sequence[Path | str], kind: str | None = None, fold_col: str | None = None,
                       task: str = "location", **csv_options) -> LabeledSet:
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
    sets = [load_labeled(p, kind, task, **csv_options) for p in path_list]
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
    if len({s.multilabel for s in sets}) > 1:
        raise ValueError(f"{', '.join(s.name for s in sets)}: some are multi-label and some are not")
    if sets[0].multilabel:
        # A label a file does not have is 0 for its proteins.
        labels = np.zeros((sum(len(s) for s in sets), len(classes)), dtype=np.int64)
        start = 0
        for s in sets:
            labels[start:start + len(s), [classes.index(c) for c in s.classes]] = s.labels
            start += len(s)
    else:
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
