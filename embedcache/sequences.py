"""Reading protein sequences from FASTA or CSV/TSV, validating them, and keying them by content.

Every problem found in the input is reported as an :class:`InputError` naming the file,
the record and the problem, before any output is written.

Residue alphabet: the 20 standard amino acids plus B, Z, J, U, O and X are accepted. B, Z,
U, O and X are tokens of ESM-2's vocabulary and are embedded as themselves; J (Leu/Ile) is
not, and fair-esm's tokenizer encodes it as ``<unk>``, which is what this package does too.
Lower case is upper-cased and one trailing ``*`` (a stop codon in translated files) is
removed. Digits, gaps (``-``, ``.``), whitespace inside a sequence line, ``*`` elsewhere and
non-ASCII characters are errors.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from Bio.SeqIO.FastaIO import SimpleFastaParser

log = logging.getLogger(__name__)

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
AMBIGUOUS = "BZJUOX"
ALPHABET = frozenset(AMINO_ACIDS + AMBIGUOUS)

FASTA_SUFFIXES = {".fasta", ".fa", ".faa", ".fas", ".fsa", ".pep", ".aa"}
TABLE_SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
ID_COLUMNS = ("id", "entry", "accession", "name", "protein_id", "uniprot_id")
SEQ_COLUMNS = ("sequence", "seq", "protein_sequence")


class InputError(ValueError):
    """A problem with an input file, worded for the person who wrote the file."""

    def __init__(self, path: Path | str, problem: str, record: str | None = None):
        self.path = str(path)
        self.record = record
        self.problem = problem
        where = f"{self.path}: {record}: " if record else f"{self.path}: "
        super().__init__(where + problem)


@dataclass(frozen=True)
class Record:
    """One input record: ``id`` is the first word of the header, ``header`` the whole line."""

    id: str
    header: str
    sequence: str

    @property
    def key(self) -> str:
        return sequence_key(self.sequence)


def sequence_key(sequence: str) -> str:
    """Content address of a sequence: sha1 of the upper-cased residues (hex)."""
    return hashlib.sha1(sequence.upper().encode("ascii")).hexdigest()


def clean_sequence(raw: str, path: Path | str, record: str) -> str:
    """Upper-case, strip one trailing '*', and reject anything outside :data:`ALPHABET`."""
    seq = raw.upper()
    if seq.endswith("*"):
        seq = seq[:-1]
    if not seq:
        raise InputError(path, "empty sequence", record)
    for pos, ch in enumerate(seq, 1):
        if ch not in ALPHABET:
            raise InputError(path, f"invalid character {_describe(ch)} at residue {pos}", record)
    return seq


def _describe(ch: str) -> str:
    if ch in "-.":
        return f"{ch!r} (alignment gap; embed unaligned sequences)"
    if ch.isspace():
        return f"{ch!r} (whitespace inside the sequence)"
    if ord(ch) > 127:
        return f"{ch!r} (non-ASCII, U+{ord(ch):04X})"
    if ch.isdigit():
        return f"{ch!r} (digit)"
    return repr(ch)


class _FastaLines:
    """Feeds lines to Biopython's parser while remembering what the parser throws away.

    ``SimpleFastaParser`` silently deletes spaces inside sequence lines, skips any text
    before the first header and reports no line numbers; a strict reader needs all three.
    """

    _INNER_SPACE = re.compile(r"\S\s+\S")

    def __init__(self, handle: Iterable[str]):
        # One iterator shared by every loop the parser runs over it, so line numbers carry on.
        self._lines = enumerate(handle, 1)
        self.header_lines: list[int] = []
        self.first_content_line: tuple[int, str] | None = None
        self.inner_space: dict[int, int] = {}  # record index -> line number

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        number, line = next(self._lines)
        stripped = line.strip()
        if stripped and self.first_content_line is None:
            self.first_content_line = (number, stripped)
        if line.startswith(">"):
            self.header_lines.append(number)
        elif self.header_lines and self._INNER_SPACE.search(stripped):
            self.inner_space.setdefault(len(self.header_lines) - 1, number)
        return line


def read_fasta(path: Path | str) -> list[Record]:
    path = Path(path)
    lines = _FastaLines(_open_text(path))
    records = []
    for index, (title, seq) in enumerate(SimpleFastaParser(lines)):
        line_no = lines.header_lines[index]
        ident = title.split(maxsplit=1)[0] if title.strip() else ""
        where = f"record {index + 1} (line {line_no}" + (f", id {ident!r})" if ident else ")")
        if not ident:
            raise InputError(path, "header has no ID", where)
        if index in lines.inner_space:
            raise InputError(
                path, f"whitespace inside the sequence on line {lines.inner_space[index]}", where
            )
        records.append(Record(ident, title.strip(), clean_sequence(seq, path, where)))
    if lines.first_content_line is None:
        raise InputError(path, "file is empty")
    number, text = lines.first_content_line
    if not text.startswith(">"):
        raise InputError(
            path,
            f"not FASTA: line {number} should start with '>' but reads {text[:40]!r}",
        )
    return records


def _open_text(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", newline=None) as handle:
            yield from handle
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except UnicodeDecodeError as err:
        raise InputError(path, f"not a text file (byte {err.start} is not UTF-8)") from None


def read_table(
    path: Path | str, id_col: str | None = None, seq_col: str | None = None, sep: str | None = None
) -> list[Record]:
    """Read a CSV/TSV with one protein per row. Column names are matched case-insensitively."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    sep = sep or TABLE_SEPARATORS.get(path.suffix.lower(), ",")
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise InputError(path, f"cannot be read as a table: {err}") from None
    id_name = _pick_column(path, frame.columns, id_col, ID_COLUMNS, "--id-col")
    seq_name = _pick_column(path, frame.columns, seq_col, SEQ_COLUMNS, "--seq-col")
    if frame.empty:
        raise InputError(path, "table has a header but no rows")
    records = []
    # Row numbers as a spreadsheet shows them: the header is row 1.
    for row, (ident, seq) in enumerate(zip(frame[id_name], frame[seq_name]), 2):
        ident = ident.strip()
        where = f"row {row}" + (f" (id {ident!r})" if ident else "")
        if not ident:
            raise InputError(path, f"empty ID in column {id_name!r}", where)
        records.append(Record(ident, ident, clean_sequence(seq.strip(), path, where)))
    return records


def _pick_column(path, columns, wanted: str | None, candidates: tuple[str, ...], option: str) -> str:
    by_lower = {str(c).lower(): str(c) for c in columns}
    if wanted is not None:
        if wanted in columns:
            return wanted
        if wanted.lower() in by_lower:
            return by_lower[wanted.lower()]
        raise InputError(path, f"no column {wanted!r}; columns are {list(map(str, columns))}")
    for name in candidates:
        if name in by_lower:
            return by_lower[name]
    raise InputError(
        path, f"cannot tell which column to use; pass {option} (columns are {list(map(str, columns))})"
    )


def detect_format(path: Path | str) -> str:
    """'fasta', 'csv' or 'tsv', from the suffix, else from the first non-blank character."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".gz", ".bz2", ".xz", ".zip"):
        raise InputError(path, "compressed input is not read directly; decompress it first")
    if suffix in FASTA_SUFFIXES:
        return "fasta"
    if suffix in TABLE_SEPARATORS:
        return "tsv" if TABLE_SEPARATORS[suffix] == "\t" else "csv"
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096).lstrip()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    return "fasta" if head.startswith(b">") or not head else "csv"


def read_sequences(
    path: Path | str,
    fmt: str | None = None,
    id_col: str | None = None,
    seq_col: str | None = None,
) -> list[Record]:
    """Read and validate every record; duplicate IDs must carry identical sequences."""
    fmt = fmt or detect_format(path)
    if fmt == "fasta":
        records = read_fasta(path)
    elif fmt in ("csv", "tsv"):
        records = read_table(path, id_col, seq_col, sep="\t" if fmt == "tsv" else None)
    else:
        raise InputError(path, f"unknown format {fmt!r} (use fasta, csv or tsv)")
    if not records:
        raise InputError(path, "no records found")
    return drop_repeated_ids(records, path)


def drop_repeated_ids(records: list[Record], path: Path | str) -> list[Record]:
    """Keep the first of records that repeat an ID with the same sequence; refuse conflicts."""
    first: dict[str, tuple[int, Record]] = {}
    kept = []
    for number, rec in enumerate(records, 1):
        seen = first.get(rec.id)
        if seen is None:
            first[rec.id] = (number, rec)
            kept.append(rec)
        elif seen[1].sequence != rec.sequence:
            raise InputError(
                path,
                f"duplicate ID {rec.id!r} with a different sequence than record {seen[0]}",
                f"record {number}",
            )
    if len(kept) < len(records):
        log.info("%s: %d repeated records (same ID and sequence) kept once", path, len(records) - len(kept))
    return kept
