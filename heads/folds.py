"""Folds and cross-validation schemes.

Folds come from the dataset file when it has them (DeepLocPro's GraphPart partitions), or
are built here: stratified random (identical sequences kept in one fold), or homology
partitioned with GraphPart so that no two folds share sequences above an identity
threshold. Schemes turn folds into (train, validation, test) splits:

``simple``  test fold k, validation fold k+1 (mod K), the rest train: K models.
``nested``  DeepLocPro's: for each test fold every other fold is the validation fold once,
            K-1 models whose test probabilities are averaged: K(K-1) models.

Built folds can be written to a folds file (``heads folds``) and read back by a run; the file
names every protein with the key of its sequence, so a run checks that it was built from the
same proteins, not only from the same IDs. Homology partitions are also kept in a cache folder
under the content they were built from, and reused.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedcache.atomic import DiskFullError, atomic_path, remove_stale_tmps
from embedcache.sequences import InputError, read_file_bytes, sequence_key, text_of_bytes

from .progress import HEARTBEAT_SECONDS, TOOL_LOGGER, ToolOutput, duration, run_tool

log = logging.getLogger(__name__)

SCHEMES = ("simple", "nested")


@dataclass(frozen=True)
class Split:
    test_fold: int
    val_fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def name(self) -> str:
        return f"test{self.test_fold}_val{self.val_fold}"


class _Scheme:
    name = ""

    def pairs(self, fold_ids: list[int]) -> list[tuple[int, int]]:
        raise NotImplementedError

    def split(self, folds: np.ndarray, test_fold: int | None = None) -> list[Split]:
        """Every fold as the test fold in turn; or only ``test_fold`` (a held-out test set).

        With a fixed test fold, ``simple`` trains one model (validation on the first other
        fold) and ``nested`` one per other fold as validation, their probabilities averaged.
        """
        folds = np.asarray(folds)
        fold_ids = sorted(int(f) for f in np.unique(folds) if f >= 0)
        if len(fold_ids) < 3:
            raise ValueError(f"{self.name} cross-validation needs at least 3 folds, found {len(fold_ids)}")
        pairs = self.pairs(fold_ids)
        if test_fold is not None:
            others = [f for f in fold_ids if f != test_fold]
            pairs = [(test_fold, others[0])] if self.name == "simple" else [(test_fold, v) for v in others]
        out = []
        for test, val in pairs:
            out.append(Split(
                test, val,
                train=np.flatnonzero((folds >= 0) & (folds != test) & (folds != val)),
                val=np.flatnonzero(folds == val),
                test=np.flatnonzero(folds == test),
            ))
        return out


class SimpleCV(_Scheme):
    name = "simple"

    def pairs(self, fold_ids):
        return [(t, fold_ids[(i + 1) % len(fold_ids)]) for i, t in enumerate(fold_ids)]


class NestedCV(_Scheme):
    name = "nested"

    def pairs(self, fold_ids):
        return [(t, v) for t in fold_ids for v in fold_ids if v != t]


def scheme(name: str) -> _Scheme:
    schemes = {"simple": SimpleCV, "nested": NestedCV}
    if name not in schemes:
        raise ValueError(f"scheme must be one of {SCHEMES}, not {name!r}")
    return schemes[name]()


def stratified_folds(labels: np.ndarray, sequences: list[str], k: int = 5, seed: int = 0) -> np.ndarray:
    """Random folds with class proportions kept; identical sequences always share a fold.

    ``labels`` is one class index per protein, or an (n, L) 0/1 matrix of label sets
    (multi-label): then iterative stratification (Sechidis et al. 2011) keeps every label's
    proportion in every fold, over the distinct sequences, each carrying the union of the
    label sets of the proteins that share it.
    """
    labels = np.asarray(labels)
    if len(labels) != len(sequences):
        raise ValueError(f"{len(labels)} labels for {len(sequences)} sequences")
    keys = [sequence_key(s) for s in sequences]
    distinct = len(set(keys))
    if distinct < k:
        raise ValueError(f"{k} folds need at least {k} distinct sequences; there are {distinct}")
    if labels.ndim == 2:
        return _multilabel_folds(labels, keys, k, seed)
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.array(keys)
    folds = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[test] = fold
    return folds


def _multilabel_folds(labels: np.ndarray, keys: list[str], k: int, seed: int) -> np.ndarray:
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    if not np.isin(labels, (0, 1)).all():
        raise ValueError("a multi-label matrix holds 0 and 1 only")
    order = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    group = np.array([order[key] for key in keys])
    union = np.zeros((len(order), labels.shape[1]), dtype=bool)
    np.logical_or.at(union, group, labels.astype(bool))
    if union.shape[1] == 1:
        # One label is a yes/no class: the single-label splitter stratifies it the same way.
        from sklearn.model_selection import StratifiedKFold

        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(union)), union[:, 0])
    else:
        splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(union)), union.astype(np.int64))
    fold_of = np.full(len(union), -1, dtype=np.int64)
    for fold, (_, test) in enumerate(parts):
        fold_of[test] = fold
    return fold_of[group]


_GRAPHPART_CHILD = """
import json, sys
from graph_part import stratified_k_fold
with open(sys.argv[1]) as handle:
    args = json.load(handle)
parts = stratified_k_fold(**args)
with open(sys.argv[2], "w") as handle:
    json.dump([[str(i) for i in part] for part in parts], handle)
"""

# What GraphPart and MMseqs2 print as they go, and the stage each line starts.
_STAGES = (
    ("createdb ", "MMseqs2: reading the sequences"),
    ("prefilter ", "MMseqs2: prefiltering"),
    ("align ", "MMseqs2: aligning every pair of sequences"),
    ("convertalis ", "MMseqs2: writing the alignments"),
    ("Initialization mode", "GraphPart: building the partitions"),
    ("clustering", "GraphPart: clustering"),
    ("Min-threshold", "GraphPart: moving or removing sequences above the threshold"),
    ("Currently have this many samples", "GraphPart: removing sequences it cannot place"),
    ("Need to remove", "GraphPart: removing sequences it cannot place"),
    ("Graph-Part executed", "GraphPart: done"),
)


def _graphpart_stage(line: str) -> str | None:
    text = line.strip()
    if text.startswith("Calculation of alignments"):
        return "MMseqs2: aligning every pair of sequences"
    for start, stage in _STAGES:
        if text.startswith(start):
            return stage
    # Alignment scores read into the graph: GraphPart's tqdm counter over the alignment table.
    if re.fullmatch(r"\d+it \[.*", text):
        return "GraphPart: reading the alignments"
    return None


@dataclass
class HomologyPartition:
    folds: np.ndarray  # -1 for sequences GraphPart removed
    threshold: float
    aligner: str
    removed: int
    cached: str | None = None  # the cache file it was read from; None: built by this call
    built: str | None = None  # when GraphPart built it (UTC, ISO 8601)
    software: str | None = None  # versions of what built it
    cache_key: str | None = None  # the content key it is cached under


ALIGNER_PROGRAMS = {"mmseqs2": "mmseqs", "needle": "needleall"}


def graphpart_labels(labels: np.ndarray, classes: Sequence[str] | None = None) -> list[str]:
    """The label of each protein as GraphPart stratifies on it: the class index as text, or
    for a label-set matrix the set's names (sorted, joined with ";"; indices without ``classes``)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return [str(l) for l in labels]
    if labels.ndim != 2:
        raise ValueError(f"labels must be one class per protein or an (n, L) matrix, not of shape {labels.shape}")
    names = [str(c) for c in classes] if classes is not None else [str(j) for j in range(labels.shape[1])]
    if len(names) != labels.shape[1]:
        raise ValueError(f"{len(names)} class names for {labels.shape[1]} label columns")
    return [";".join(sorted(names[j] for j in np.flatnonzero(row))) for row in labels]


# What GraphPart's FASTA headers (">ID|label=LABEL") and MMseqs2 (the first word) read back whole.
_GRAPHPART_ID = re.compile(r"[A-Za-z0-9_.+/-]+")
_GRAPHPART_LABEL = re.compile(r"[^|:=\s]*(?: [^|:=\s]+)*")


def _graphpart_names(ids: Sequence[str], labels: list[str]) -> tuple[list[str], list[str]]:
    """IDs and labels as GraphPart is given them: as they are, or numbered where some would be misread.

    GraphPart splits its headers at '|' and ':' and MMseqs2 keeps the first word, so an ID
    with a space or a '|' would come back as another (its relatives then land in other folds,
    silently): all IDs are then replaced by p0, p1, ... and mapped back. Labels likewise.
    """
    names = list(ids)
    if not all(_GRAPHPART_ID.fullmatch(i) for i in names):
        log.info("some IDs hold characters GraphPart or MMseqs2 would misread (spaces, '|', ':', ...): GraphPart "
                 "is given them numbered")
        names = [f"p{n}" for n in range(len(names))]
    if not all(_GRAPHPART_LABEL.fullmatch(l) for l in labels):
        number = {label: n for n, label in enumerate(dict.fromkeys(labels))}
        labels = [f"label{number[l]}" for l in labels]
    return names, labels


def homology_folds(
    ids: list[str],
    sequences: list[str],
    labels: np.ndarray,
    k: int = 5,
    threshold: float = 0.3,
    aligner: str = "mmseqs2",
    threads: int = 2,
    classes: Sequence[str] | None = None,
) -> HomologyPartition:
    """GraphPart partitions: no pair across folds above ``threshold`` identity.

    GraphPart removes sequences it cannot place without breaking the threshold, as
    DeepLocPro reported; they get fold -1 and are counted. ``labels`` as for
    :func:`graphpart_labels` (``classes`` names the columns of a label-set matrix).
    """
    binary = ALIGNER_PROGRAMS.get(aligner)
    if binary is None:
        raise ValueError(f"aligner must be mmseqs2 or needle, not {aligner!r}")
    if shutil.which(binary) is None:
        raise RuntimeError(
            f"GraphPart with {aligner} needs the '{binary}' program; install it (Debian: apt-get install "
            f"{'mmseqs2' if aligner == 'mmseqs2' else 'emboss'})"
        )
    log.info("homology partitioning of %d sequences with GraphPart (%s, identity %.2f, %d folds): aligns every "
             "pair, minutes for thousands of sequences; a progress line every %.0f s", len(ids), aligner, threshold,
             k, HEARTBEAT_SECONDS)
    # GraphPart prints (and so do the MMseqs2 runs it starts) into the process's stdout, which
    # belongs to the results: it runs in a child Python whose output is logged line by line.
    # Its temporary files go to the working directory, so the child works in a directory of its
    # own, and it calls a helper script (mmseqs_fake_prefilter.sh) installed beside this Python,
    # which is not on PATH when a virtual environment's python is run without activating it.
    path = os.environ.get("PATH", "")
    scripts = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([scripts, path]) if path else scripts,
           "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "10"}
    names, texts = _graphpart_names(ids, graphpart_labels(labels, classes))
    args = {
        "sequences": dict(zip(names, sequences)),
        "labels": dict(zip(names, texts)),
        "partitions": k,
        "threshold": threshold,
        "alignment_mode": aligner,
        "threads": threads,
        # Identity over the shorter sequence for MMseqs2 (the stricter choice; GraphPart's
        # default 'full' exists only for needle).
        "denominator": "shortest" if aligner == "mmseqs2" else "full",
    }
    output = ToolOutput(logging.getLogger(TOOL_LOGGER + ".graphpart"), _graphpart_stage)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="graphpart_") as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "partitions.json"
        request.write_text(json.dumps(args))  # a scratch file of this call, deleted with its folder
        run_tool([sys.executable, "-c", _GRAPHPART_CHILD, str(request), str(answer)], "GraphPart", output,
                 cwd=tmp, env=env)
        try:
            parts = json.loads(answer.read_text())
        except (OSError, ValueError) as err:
            last = "\n".join(output.tail[-8:])
            raise RuntimeError(f"GraphPart gave no partitions ({err}); its last output:\n{last}") from None
    fold_of = {ident: fold for fold, members in enumerate(parts) for ident in members}
    unknown = sorted(set(fold_of) - set(names))
    if unknown:  # an ID misread on the way: its protein would look removed, its relatives in another fold
        raise RuntimeError(f"GraphPart returned IDs it was not given ({', '.join(map(repr, unknown[:5]))}); "
                           "the partition cannot be trusted")
    folds = np.array([fold_of.get(name, -1) for name in names], dtype=np.int64)
    removed = int((folds < 0).sum())
    log.info("GraphPart (%s, identity %.2f): %d folds, %d of %d sequences removed, in %s",
             aligner, threshold, k, removed, len(ids), duration(time.monotonic() - start))
    return HomologyPartition(folds, threshold, aligner, removed, built=_now(), software=homology_software(aligner))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _aligner_version(aligner: str) -> str:
    """The aligner's own version string: part of what a cached partition was built with."""
    program = ALIGNER_PROGRAMS.get(aligner)
    found = shutil.which(program) if program else None
    if found is None:
        return "not installed"
    command = [found, "version"] if aligner == "mmseqs2" else [found, "-version"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    text = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return text[-1].strip() if text else "unknown"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def homology_software(aligner: str) -> str:
    """What a homology partition depends on besides its input: GraphPart's and the aligner's versions."""
    return f"graph-part {_package_version('graph-part')}, {aligner} {_aligner_version(aligner)}"


def _heads_version() -> str:
    import embedcache

    return f"heads {embedcache.__version__}"


# -- folds files ------------------------------------------------------------------------------
FOLDS_FORMAT = 1
FOLDS_MAGIC = "# heads folds file, format "
FOLDS_COLUMNS = ("id", "fold", "sequence_key")
FOLD_METHODS = ("homology", "stratified")
_SHA1_HEX = re.compile(r"[0-9a-f]{40}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HEADER_FIELD = re.compile(r"#\s*([a-z_0-9]+):\s?(.*)")
_REQUIRED = ("method", "k", "proteins", "removed", "content_sha256", "folds_sha256")


def content_digest(ids: Sequence[str], keys: Sequence[str]) -> str:
    """sha256 of the sorted (ID, sequence key) pairs: which proteins a partition is of, in any order."""
    digest = hashlib.sha256()
    for ident, key in sorted(zip(ids, keys)):
        digest.update(f"{ident}\0{key}\0".encode())
    return digest.hexdigest()


def folds_digest(ids: Sequence[str], folds: np.ndarray) -> str:
    """sha256 of the sorted (ID, fold) pairs: an edited or damaged file no longer matches its header."""
    digest = hashlib.sha256()
    for ident, fold in sorted(zip(ids, (int(f) for f in folds))):
        digest.update(f"{ident}\0{fold}\0".encode())
    return digest.hexdigest()


@dataclass
class Partition:
    """Folds of a set of proteins and how they were built: what a folds file holds."""

    ids: list[str]
    keys: list[str]  # embedcache sequence_key of each protein's sequence
    folds: np.ndarray  # fold of each protein; -1: left out (GraphPart could not place it)
    method: str  # homology (GraphPart) | stratified
    k: int  # folds asked for
    seed: int = 0  # stratified: the random seed (recorded for homology, which does not use it)
    threshold: float | None = None  # homology: the identity allowed across folds
    aligner: str | None = None  # homology: GraphPart's aligner (mmseqs2 | needle)
    built: str = ""  # when (UTC, ISO 8601)
    software: str = ""  # versions of what built it
    data: str = ""  # the data file(s) it was built from, for a reader (identity is content_sha256)
    cache_key: str | None = None  # homology: the content key of the partition cache
    cached: str | None = None  # the cache file a homology partition was reused from, if so

    def __post_init__(self) -> None:
        self.folds = np.asarray(self.folds, dtype=np.int64)
        if not (len(self.ids) == len(self.keys) == len(self.folds)):
            raise ValueError(f"{len(self.ids)} IDs, {len(self.keys)} sequence keys and {len(self.folds)} folds")

    @property
    def removed(self) -> int:
        return int((self.folds < 0).sum())

    @property
    def sizes(self) -> dict[int, int]:
        return {f: int((self.folds == f).sum()) for f in range(self.k)}

    @property
    def content_sha256(self) -> str:
        return content_digest(self.ids, self.keys)

    def describe(self) -> str:
        """"homology: GraphPart, mmseqs2, 30% identity" / "stratified, seed 0"."""
        if self.method == "homology":
            return f"homology: GraphPart, {self.aligner}, {self.threshold or 0:.0%} identity"
        return f"{self.method}, seed {self.seed}"

    def summary(self) -> str:
        """One line: folds, sizes, removed."""
        sizes = ", ".join(f"{n:,}" for n in self.sizes.values())
        return (f"{self.k} folds ({self.describe()}) of {len(self.ids):,} proteins, sizes {sizes}; "
                f"{self.removed:,} removed")


@dataclass
class FoldsFile:
    """A folds file as read: its partition, and the file's identity."""

    path: Path
    sha256: str  # of the file's bytes as read
    partition: Partition
    header: dict[str, str] = field(default_factory=dict)

    def info(self) -> dict:
        """What a run records of the folds it read (config.json's folds_info)."""
        p = self.partition
        out: dict = {"path": str(self.path), "sha256": self.sha256, "method": p.method, "k": p.k, "seed": p.seed,
                     "proteins_in_file": len(p.ids), "removed_in_file": p.removed,
                     "content_sha256": p.content_sha256, "built": p.built, "software": p.software}
        if p.method == "homology":
            out.update(threshold=p.threshold, aligner=p.aligner)
        return out


def _header_value(value: object) -> str:
    # One line each: a file name with a newline or tab would break the header.
    return re.sub(r"[\x00-\x1f\x7f]", "?", str(value))


def folds_text(partition: Partition) -> str:
    """The folds file of ``partition``: ``#`` header lines, then id, fold, sequence_key (tab-separated)."""
    p = partition
    if p.method not in FOLD_METHODS:
        raise ValueError(f"method must be one of {FOLD_METHODS}, not {p.method!r}")
    fields: list[tuple[str, object]] = [("method", p.method), ("k", p.k), ("seed", p.seed)]
    if p.method == "homology":
        fields += [("threshold", f"{p.threshold:g}"), ("aligner", p.aligner)]
    fields += [("proteins", len(p.ids)), ("removed", p.removed),
               ("sizes", ",".join(str(n) for n in p.sizes.values())),
               ("content_sha256", p.content_sha256), ("folds_sha256", folds_digest(p.ids, p.folds))]
    if p.cache_key:
        fields.append(("cache_key", p.cache_key))
    fields += [("built", p.built), ("software", p.software), ("data", p.data)]
    lines = [f"{FOLDS_MAGIC}{FOLDS_FORMAT}",
             "## One protein per row: fold -1 = left out (GraphPart could not place it without breaking the",
             "## threshold); sequence_key = sha1 of the upper-cased sequence. content_sha256 = sha256 of the",
             "## sorted (id NUL sequence_key NUL) pairs, folds_sha256 of the sorted (id NUL fold NUL) pairs.",
             *(f"# {name}: {_header_value(value)}" for name, value in fields)]
    body = io.StringIO()
    writer = csv.writer(body, delimiter="\t", lineterminator="\n")
    writer.writerow(FOLDS_COLUMNS)
    for ident, fold, key in zip(p.ids, p.folds, p.keys):
        writer.writerow((ident, int(fold), key))
    return "\n".join(lines) + "\n" + body.getvalue()


def write_folds(partition: Partition, path: Path | str) -> Path:
    """Write ``partition`` as a folds file, whole or not at all (two writers at once: the last one wins)."""
    path = Path(path)
    remove_stale_tmps(path)
    data = folds_text(partition).encode("utf-8")
    with atomic_path(path, unique=True) as tmp:
        tmp.write_bytes(data)
    return path


def _read_regular(path: Path) -> bytes:
    return read_file_bytes(path, "a folds file written by heads folds", regular_only=True)


def read_folds(path: Path | str) -> FoldsFile:
    """Read and check a folds file: its header, every row, and the rows against the header's digests."""
    path = Path(path)
    raw = _read_regular(path)
    sha256 = hashlib.sha256(raw).hexdigest()
    text = text_of_bytes(str(path), raw).text
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip()), None)
    if start is None:
        raise InputError(path, "file is empty")
    first = lines[start].strip()
    if not first.startswith(FOLDS_MAGIC):
        raise InputError(path, f"not a folds file of heads (its first line should be '{FOLDS_MAGIC}{FOLDS_FORMAT}'; "
                               f"it reads {first[:60]!r}); write one with heads folds, or give a column of the "
                               "data with --fold-col")
    version = first[len(FOLDS_MAGIC):].strip()
    if not version.isdigit():
        raise InputError(path, f"damaged header: line {start + 1} gives format {version!r}")
    if int(version) > FOLDS_FORMAT:
        raise InputError(path, f"folds file format {version}, newer than this heads reads ({FOLDS_FORMAT}); "
                               "update heads")
    header: dict[str, str] = {}
    number = start + 1
    while number < len(lines) and lines[number].lstrip().startswith("#"):
        match = _HEADER_FIELD.fullmatch(lines[number].strip())
        if match is not None:
            if match.group(1) in header:
                raise InputError(path, f"damaged header: {match.group(1)!r} given twice", f"line {number + 1}")
            header[match.group(1)] = match.group(2).strip()
        number += 1
    missing = [name for name in _REQUIRED if name not in header]
    if missing:
        raise InputError(path, f"damaged header: no {', '.join(missing)} (truncated or edited?); build it again "
                               "with heads folds")
    partition = _partition_of(path, header, lines, number)
    return FoldsFile(path, sha256, partition, header)


def _int_field(path: Path, header: dict[str, str], name: str, minimum: int) -> int:
    value = header[name]
    if not re.fullmatch(r"-?\d+", value) or int(value) < minimum:
        raise InputError(path, f"damaged header: {name} {value!r} is not a whole number >= {minimum}")
    return int(value)


def _partition_of(path: Path, header: dict[str, str], lines: list[str], body_start: int) -> Partition:
    method = header["method"]
    if method not in FOLD_METHODS:
        raise InputError(path, f"damaged header: method {method!r} is not one of {', '.join(FOLD_METHODS)}")
    k = _int_field(path, header, "k", 2)
    proteins = _int_field(path, header, "proteins", 0)
    removed = _int_field(path, header, "removed", 0)
    seed = _int_field(path, header, "seed", -(2**63)) if "seed" in header else 0
    for name in ("content_sha256", "folds_sha256", *(["cache_key"] if "cache_key" in header else [])):
        if not _SHA256_HEX.fullmatch(header[name]):
            raise InputError(path, f"damaged header: {name} {header[name][:70]!r} is not a sha256")
    threshold, aligner = None, None
    if method == "homology":
        if "threshold" not in header or "aligner" not in header:
            raise InputError(path, "damaged header: a homology partition without its threshold and aligner")
        try:
            threshold = float(header["threshold"])
        except ValueError:
            threshold = -1.0
        if not 0 <= threshold <= 1:
            raise InputError(path, f"damaged header: threshold {header['threshold']!r} is not a number from 0 to 1")
        aligner = header["aligner"]
    ids, keys, folds, first_line = _rows(path, lines, body_start, k)
    partition = Partition(ids, keys, np.array(folds, dtype=np.int64), method, k, seed, threshold, aligner,
                          built=header.get("built", ""), software=header.get("software", ""),
                          data=header.get("data", ""), cache_key=header.get("cache_key"))
    if len(ids) != proteins:
        raise InputError(path, f"holds {len(ids):,} proteins but its header says {proteins:,} (truncated or "
                               "edited?); build it again with heads folds")
    if partition.content_sha256 != header["content_sha256"] or folds_digest(ids, partition.folds) != \
            header["folds_sha256"] or partition.removed != removed:
        raise InputError(path, "its rows do not match the digests in its header (edited or damaged?); build it "
                               "again with heads folds")
    return partition


def _rows(path: Path, lines: list[str], start: int, k: int) -> tuple[list[str], list[str], list[int], int]:
    body = "\n".join(lines[start:])
    reader = csv.reader(io.StringIO(body, newline=""), delimiter="\t")
    columns: list[str] | None = None
    ids: list[str] = []
    keys: list[str] = []
    folds: list[int] = []
    seen: dict[str, int] = {}
    index: dict[str, int] = {}
    done = start  # lines consumed so far; a row starts on the next one
    header_line = 0
    try:
        for fields in reader:
            line, done = done + 1, start + reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if columns is None:
                columns, header_line = [c.strip() for c in fields], line
                absent = [c for c in FOLDS_COLUMNS if c not in columns]
                if absent:
                    raise InputError(path, f"no column {', '.join(map(repr, absent))}; the columns are {columns} "
                                           f"(line {line}); a folds file has {', '.join(FOLDS_COLUMNS)}")
                index = {c: columns.index(c) for c in FOLDS_COLUMNS}
                continue
            where = f"line {line}"
            if len(fields) != len(columns):
                raise InputError(path, f"{len(fields)} tab-separated fields, the column line (line {header_line}) "
                                       f"has {len(columns)} (truncated or edited?)", where)
            ident, fold, key = (fields[index[c]] for c in FOLDS_COLUMNS)
            if not ident:
                raise InputError(path, "empty id", where)
            if not re.fullmatch(r"-?\d+", fold.strip()) or not -1 <= int(fold) < k:
                raise InputError(path, f"fold {fold!r} of {ident!r} is not a whole number from -1 (left out) to "
                                       f"{k - 1} (the header says k = {k})", where)
            if not _SHA1_HEX.fullmatch(key):
                raise InputError(path, f"sequence_key {key[:50]!r} of {ident!r} is not a sequence key (40 hex "
                                       "digits; truncated?)", where)
            if ident in seen:
                raise InputError(path, f"ID {ident!r} appears twice (lines {seen[ident]} and {line})")
            seen[ident] = line
            ids.append(ident)
            keys.append(key)
            folds.append(int(fold))
    except csv.Error as err:
        raise InputError(path, f"cannot be read as a tab-separated table: {err} (near line {done})") from None
    if columns is None:
        raise InputError(path, "no column line (id, fold, sequence_key) after the header (truncated?)")
    return ids, keys, folds, header_line


def folds_for(folds_file: FoldsFile, ids: Sequence[str], sequences: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Each protein's fold from ``folds_file``, checked by sequence: the folds, and the file's IDs not in the data.

    Every protein must be in the file with the same sequence key; the data may be a subset.
    """
    part, name = folds_file.partition, folds_file.path.name
    where = dict(zip(part.ids, range(len(part.ids))))
    missing, other = [], []
    folds = np.full(len(ids), -1, dtype=np.int64)
    for n, (ident, sequence) in enumerate(zip(ids, sequences)):
        row = where.get(ident)
        if row is None:
            missing.append(ident)
        elif part.keys[row] != sequence_key(sequence):
            other.append(ident)
        else:
            folds[n] = part.folds[row]
    if other:
        raise InputError(folds_file.path, f"ID {_named(other)} {'has' if len(other) == 1 else 'have'} another "
                                          f"sequence in {name} (made from other data?); build the folds again "
                                          "with heads folds")
    if missing:
        raise InputError(folds_file.path, f"ID {_named(missing)} of the data {'is' if len(missing) == 1 else 'are'} "
                                          f"not in {name} (made from other data?); build the folds again with "
                                          "heads folds")
    unused = sorted(set(part.ids) - set(ids))
    if unused:
        log.info("%s: %d of its %d proteins are not in the data (the data is a subset), e.g. %s", folds_file.path,
                 len(unused), len(part.ids), ", ".join(unused[:3]))
    left_out = int((folds < 0).sum())
    if left_out:
        log.info("%s: %d proteins of the data are left out (fold -1)", folds_file.path, left_out)
    return folds, unused


def _named(ids: list[str]) -> str:
    shown = ", ".join(map(repr, ids[:5]))
    return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


# -- the homology partition cache -------------------------------------------------------------
CACHE_ENV = "HEADS_CACHE_DIR"


def folds_cache_dir() -> Path:
    """Where homology partitions are cached: $HEADS_CACHE_DIR, else $XDG_CACHE_HOME/heads/folds,
    else ~/.cache/heads/folds."""
    own = os.environ.get(CACHE_ENV)
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG specification: a relative path is invalid and ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "heads" / "folds"


def homology_cache_key(ids: Sequence[str], keys: Sequence[str], labels: Sequence[str], k: int, threshold: float,
                       aligner: str, software: str | None = None) -> str:
    """What a GraphPart partition is a function of: the sorted (ID, sequence key, label) triples,
    the settings, and the versions of GraphPart and the aligner."""
    triples = hashlib.sha256()
    for ident, key, label in sorted(zip(ids, keys, labels)):
        triples.update(f"{ident}\0{key}\0{label}\0".encode())
    settings = {"format": FOLDS_FORMAT, "proteins": triples.hexdigest(), "k": int(k), "threshold": float(threshold),
                "aligner": aligner, "denominator": "shortest" if aligner == "mmseqs2" else "full",
                "software": software if software is not None else homology_software(aligner)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def homology_partition(
    ids: list[str],
    sequences: list[str],
    labels: np.ndarray,
    k: int = 5,
    threshold: float = 0.3,
    aligner: str = "mmseqs2",
    threads: int = 2,
    classes: Sequence[str] | None = None,
    cache: bool = True,
    data_name: str = "",
) -> HomologyPartition:
    """:func:`homology_folds`, reused from the cache folder when built before from the same content.

    A cached file is found by a key of the proteins (IDs, sequences, labels), the settings and
    the software's versions, and is read as any folds file, checked against these proteins; a
    damaged one is ignored (with a warning) and built again. Storing needs no lock: each writer
    renames a complete file of its own into place.
    """
    if aligner not in ALIGNER_PROGRAMS:
        raise ValueError(f"aligner must be mmseqs2 or needle, not {aligner!r}")
    keys = [sequence_key(s) for s in sequences]
    software = homology_software(aligner)
    key = homology_cache_key(ids, keys, graphpart_labels(labels, classes), k, threshold, aligner, software)
    path = folds_cache_dir() / f"{key}.tsv"
    if cache:
        found = _cached(path, key, ids, sequences)
        if found is not None:
            return found
    part = homology_folds(ids, sequences, labels, k, threshold, aligner, threads, classes)
    part.cache_key = key
    if cache:
        record = Partition(list(ids), keys, part.folds, "homology", k, 0, threshold, aligner, built=part.built or "",
                           software=part.software or software, data=data_name, cache_key=key)
        try:
            write_folds(record, path)
            log.info("homology folds stored in the cache: %s", path)
        except (OSError, DiskFullError) as err:  # the folds are there; only their reuse is lost
            log.warning("%s: could not store the homology folds in the cache (%s); they are built again next time "
                        "(set %s to a writable folder)", path, err, CACHE_ENV)
    return part


def _cached(path: Path, key: str, ids: Sequence[str], sequences: Sequence[str]) -> HomologyPartition | None:
    try:
        if not path.exists():
            return None
        found = read_folds(path)
        part = found.partition
        if part.cache_key != key or part.method != "homology":
            raise InputError(path, "its header names another partition")
        folds, unused = folds_for(found, ids, sequences)
        if unused:
            raise InputError(path, f"holds {len(unused)} proteins not asked for")
    except (InputError, OSError) as err:
        log.warning("%s: ignoring a damaged cached partition (%s); building it again", path, err)
        return None
    log.info("reusing homology folds from %s (built on %s%s)", path, part.built or "an unknown date",
             f" from {part.data}" if part.data else "")
    return HomologyPartition(folds, float(part.threshold or 0), str(part.aligner), int((folds < 0).sum()),
                             cached=str(path), built=part.built, software=part.software, cache_key=key)


def build_partition(
    ids: list[str],
    sequences: list[str],
    labels: np.ndarray,
    method: str = "homology",
    k: int = 5,
    threshold: float = 0.3,
    aligner: str = "mmseqs2",
    seed: int = 0,
    threads: int = 2,
    classes: Sequence[str] | None = None,
    cache: bool = True,
    data_name: str = "",
) -> Partition:
    """Folds of these proteins by ``method`` (homology: GraphPart, through the cache; stratified),
    with what a folds file records of them."""
    if method not in FOLD_METHODS:
        raise ValueError(f"method must be one of {FOLD_METHODS}, not {method!r}")
    if not ids:
        raise ValueError("no proteins to partition")
    keys = [sequence_key(s) for s in sequences]
    if method == "homology":
        part = homology_partition(ids, sequences, labels, k, threshold, aligner, threads, classes, cache, data_name)
        return Partition(list(ids), keys, part.folds, method, k, seed, threshold, aligner,
                         built=part.built or _now(), software=f"{_heads_version()}, {part.software}",
                         data=data_name, cache_key=part.cache_key, cached=part.cached)
    folds = stratified_folds(labels, sequences, k, seed)
    software = f"{_heads_version()}, scikit-learn {_package_version('scikit-learn')}"
    if np.asarray(labels).ndim == 2:
        software += f", iterative-stratification {_package_version('iterative-stratification')}"
    return Partition(list(ids), keys, folds, method, k, seed, built=_now(), software=software, data=data_name)
