"""Reading protein sequences from FASTA or CSV/TSV, validating them, and keying them by content.

Every problem found in the input is reported as an :class:`InputError` naming the file,
the record and the problem, before any output is written. The path ``-`` reads standard input
(the string ``"./-"`` names a file called ``-``).

The input is judged as it is: nothing is changed before it is validated. A file (or ``-``,
standard input, read once) is read whole; gzip, bzip2 and xz are recognised by their magic
bytes, whatever the name; a UTF-8 byte-order mark is skipped; anything else that is not UTF-8
text (UTF-16/32, Latin-1, binary) is refused with the byte offset and line. FASTA or table is
decided by the content (a line starting with ``>``), the table's delimiter (comma, tab,
semicolon or ``|``) by its header line; a suffix that disagrees is logged as a warning.

Residue alphabet: the 20 standard amino acids plus B, Z, J, U, O and X are accepted, upper or
lower case (ASCII only). B, Z, U, O and X are tokens of ESM-2's vocabulary and are embedded as
themselves; J (Leu/Ile) is not, and fair-esm's tokenizer encodes it as ``<unk>``, which is what
this package does too. Lower case is upper-cased after validation and one trailing ``*`` (a stop
codon in translated files) is removed. Digits, gaps (``-``, ``.``), whitespace inside a sequence
line, ``*`` elsewhere and non-ASCII characters are errors: ``str.upper`` would turn ``ß`` into
``SS`` and ``ı`` into ``I``, so nothing outside ASCII may ever reach it.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import logging
import lzma
import os
import re
import stat
import sys
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
AMBIGUOUS = "BZJUOX"
ALPHABET = frozenset(AMINO_ACIDS + AMBIGUOUS)

FASTA_SUFFIXES = {".fasta", ".fa", ".faa", ".fas", ".fsa", ".pep", ".aa"}
TABLE_SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
# Checked in this order; on a tie in the number of header fields the first wins.
DELIMITERS = (",", "\t", ";", "|")
_SEP_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "'|'"}
ID_COLUMNS = ("id", "entry", "accession", "name", "protein_id", "uniprot_id")
SEQ_COLUMNS = ("sequence", "seq", "protein_sequence")

STDIN = "-"
STDIN_NAME = "<stdin>"

# ASCII whitespace only: stripping U+00A0 or U+2003 would hide a character the file really holds.
_ASCII_SPACE = " \t\n\r\x0b\x0c"
_INNER_SPACE = re.compile(r"[ \t\x0b\x0c]")
_LETTERS = AMINO_ACIDS + AMBIGUOUS + (AMINO_ACIDS + AMBIGUOUS).lower()
# No re.IGNORECASE: under it 'ſ' (U+017F) matches 's' and the Kelvin sign matches 'k'.
_INVALID_RESIDUE = re.compile(f"[^{_LETTERS}]")
_HEADER_LINE = re.compile(r"^[ \t]*>", re.MULTILINE)
_COMPRESSION_SUFFIXES = {".gz", ".gzip", ".bz2", ".xz", ".lzma"}


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
    line: int = field(default=0, compare=False)  # FASTA header line or table row (1-based); 0 if not from a file

    @property
    def key(self) -> str:
        return sequence_key(self.sequence)


def sequence_key(sequence: str) -> str:
    """Content address of a sequence: sha1 of the upper-cased residues (hex).

    Only ASCII is upper-cased (``bytes.upper``); a non-ASCII character is an error, never folded
    into an ASCII letter.
    """
    try:
        data = sequence.encode("ascii")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"sequence has a non-ASCII character {_describe(sequence[err.start])} at residue {err.start + 1}; "
            "validate sequences with clean_sequence before keying them"
        ) from None
    return hashlib.sha1(data.upper()).hexdigest()


def clean_sequence(
    raw: str, path: Path | str, record: str, *, lines: list[tuple[int, int, int]] | None = None
) -> str:
    """Validate, strip one trailing '*', then upper-case (ASCII only).

    ``lines`` locates residues in the file for the message: (line number, index in ``raw`` of the
    line's first residue, column of that residue), one per sequence line.
    """
    seq = raw[:-1] if raw.endswith("*") else raw
    if not seq:
        raise InputError(path, "empty sequence", record)
    bad = _INVALID_RESIDUE.search(seq)
    if bad is not None:
        pos = bad.start()
        raise InputError(
            path, f"invalid character {_describe(seq[pos])} at residue {pos + 1}{_locate(lines, pos)}", record
        )
    return seq.upper()


def _locate(lines: list[tuple[int, int, int]] | None, pos: int) -> str:
    if not lines:
        return ""
    number, start, column = next(entry for entry in reversed(lines) if entry[1] <= pos)
    return f" (line {number}, column {column + pos - start})"


def _describe(ch: str) -> str:
    code = f"U+{ord(ch):04X}"
    name = unicodedata.name(ch, "")
    if ch in "-.":
        return f"{ch!r} (alignment gap; embed unaligned sequences)"
    if ch == "\ufeff":
        return f"{ch!r} (byte-order mark, {code}; were files concatenated?)"
    if ch.isspace():
        return f"{ch!r} (whitespace inside the sequence, {code}{' ' + name if name else ''})"
    if ord(ch) > 127:
        return f"{ch!r} (non-ASCII, {code}{' ' + name if name else ''})"
    if ch.isdigit():
        return f"{ch!r} (digit)"
    if not ch.isprintable():
        return f"{ch!r} (control character, {code})"
    return repr(ch)


# ---------------------------------------------------------------------------------------------
# Bytes to text


@dataclass(frozen=True)
class InputText:
    """An input read whole and decoded; every reader parses this, so a file or stdin is read once."""

    name: str  # the path as given, or "<stdin>"; every message starts with it
    text: str  # decoded UTF-8, byte-order mark skipped, line endings made "\n"
    suffix: str  # lower-case suffix that names the format (".fasta", ".csv"); "" for stdin
    compression: str | None  # "gzip", "bz2", "xz" ("bz2-inside-gzip" for layers) when compressed


_stdin_data: bytes | None = None
_warned: set[str] = set()


def _warn(message: str) -> None:
    """Log a warning about an input once: detecting and reading the same file must not repeat it."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _stdin_bytes() -> bytes:
    """Standard input, read fully the first time and kept, so detecting and reading see the same bytes."""
    global _stdin_data
    if _stdin_data is None:
        stream = sys.stdin
        if stream is None:
            raise InputError(STDIN_NAME, "there is no standard input to read")
        if stream.isatty():
            raise InputError(STDIN_NAME, "standard input is a terminal; pipe or redirect a file into it")
        buffer = getattr(stream, "buffer", None)
        _stdin_data = buffer.read() if buffer is not None else stream.read().encode("utf-8")
    return _stdin_data


def _read_file(path: Path) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise InputError(path, f"file not found (broken symbolic link to {os.readlink(path)})") from None
        raise InputError(path, "file not found") from None
    except OSError as err:
        raise InputError(path, f"cannot be read: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(path, "is a directory; give a FASTA or CSV/TSV file")
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise InputError(path, f"cannot be read: {err.strerror or err}") from None


def _is_bz2(data: bytes) -> bool:
    # "BZh" alone could start a text file; a block or end-of-stream magic must follow the level digit.
    return (
        data[:3] == b"BZh" and data[3:4].isdigit() and data[4:10] in (b"1AY&SY", b"\x17rE8P\x90")
    )


_DECOMPRESSORS = (
    ("gzip", lambda d: d[:2] == b"\x1f\x8b", gzip.decompress),
    ("bz2", _is_bz2, bz2.decompress),
    ("xz", lambda d: d[:6] == b"\xfd7zXZ\x00", lzma.decompress),
)

# Containers and formats the standard library cannot (or should not) unpack for us.
_REFUSED = (
    (lambda d: d[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"),
     "a zip archive; unzip it and give the FASTA or CSV file inside (a zip can hold several files)"),
    (lambda d: d[257:262] == b"ustar", "a tar archive; extract it and give the FASTA or CSV file inside"),
    (lambda d: d[:4] == b"\x28\xb5\x2f\xfd",
     "zstd-compressed; decompress it first (zstd -d), or use gzip, bzip2 or xz"),
    (lambda d: d[:6] == b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive; extract it first"),
    (lambda d: d[:8] == b"\x89HDF\r\n\x1a\n", "an HDF5 file (an embedding cache?), not sequences"),
)


def _decompress(name: str, data: bytes) -> tuple[bytes, str | None]:
    """The bytes inside any gzip/bz2/xz layers (a .gz of a .gz too), and the layers' names."""
    layers: list[str] = []
    for _ in range(4):
        found = next((entry for entry in _DECOMPRESSORS if entry[1](data)), None)
        if found is None:
            break
        kind, _, decompress = found
        described = "-inside-".join([kind, *reversed(layers)])
        try:
            data = decompress(data)
        except (EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as err:
            if isinstance(err, EOFError) or "ended before the end-of-stream" in str(err):
                raise InputError(name, f"truncated {described} data: the file ends before the compressed "
                                       "stream does (an interrupted download or copy?)") from None
            raise InputError(name, f"corrupt {described} data ({err})") from None
        layers.append(kind)
    return data, "-inside-".join(reversed(layers)) or None


_WIDE_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def _decode(name: str, data: bytes, compression: str | None) -> str:
    after = f" of the {compression}-decompressed data" if compression else ""
    for bom, encoding in _WIDE_BOMS:
        if data.startswith(bom):
            raise InputError(name, f"{encoding} text; save it as UTF-8")
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0

    def where(offset: int) -> str:
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        return f"byte offset {offset}{after} (line {line}, byte {column} of the line)"

    nul = data.find(b"\x00", skip)
    if nul >= 0:
        raise InputError(name, f"NUL byte at {where(nul)}: not a text file, or UTF-16/32 text without "
                               "a byte-order mark; save it as UTF-8 text")
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = err.start + skip
        raise InputError(name, f"not UTF-8 text: byte 0x{data[offset]:02X} at {where(offset)} is not valid "
                               "UTF-8 (Latin-1 or Windows-1252?); save the file as UTF-8") from None
    # Universal newlines, as text-mode open() does: CRLF and lone CR end a line.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _format_suffix(name: str) -> str:
    suffixes = [s.lower() for s in Path(name).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def load_text(path: Path | str) -> InputText:
    """Read ``path`` (``-``: standard input) whole: decompress by magic bytes, decode UTF-8, refuse the rest."""
    if str(path) == STDIN:
        name, data, suffix = STDIN_NAME, _stdin_bytes(), ""
    else:
        path = Path(path)
        name, data, suffix = str(path), _read_file(path), _format_suffix(str(path))
    data, compression = _decompress(name, data)
    for matches, problem in _REFUSED:
        if matches(data):
            raise InputError(name, problem)
    return InputText(name, _decode(name, data, compression), suffix, compression)


# ---------------------------------------------------------------------------------------------
# FASTA or table


def _first_line(text: str) -> tuple[int, str] | None:
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip(_ASCII_SPACE)
        if stripped:
            return number, stripped
    return None


def _split_header(line: str, sep: str) -> int:
    return len(next(csv.reader([line], delimiter=sep), []))


def _sniff_delimiter(line: str) -> str | None:
    counts = [(_split_header(line, sep), sep) for sep in DELIMITERS]
    best = max(counts, key=lambda c: c[0])  # max keeps the first of equals
    return best[1] if best[0] > 1 else None


def _content_format(src: InputText) -> str | None:
    """'fasta', 'table' or None (neither), from the content alone."""
    first = _first_line(src.text)
    if first is None:
        raise InputError(src.name, "file is empty")
    # Any line starting with '>' means FASTA, even after stray text (which read_fasta reports);
    # no table has a line that starts with '>'.
    if first[1].startswith(">") or _HEADER_LINE.search(src.text):
        return "fasta"
    if _sniff_delimiter(first[1]) is not None:
        return "table"
    return None


def _suffix_format(suffix: str) -> str | None:
    if suffix in FASTA_SUFFIXES:
        return "fasta"
    if suffix in TABLE_SEPARATORS:
        return "tsv" if TABLE_SEPARATORS[suffix] == "\t" else "csv"
    return None


def _choose_format(src: InputText, fmt: str | None) -> tuple[str, str | None]:
    """('fasta', None) or ('csv'|'tsv', delimiter): ``fmt`` when given (checked against the content),
    else the content; a suffix that disagrees is logged."""
    content = _content_format(src)
    by_suffix = _suffix_format(src.suffix)
    if fmt is not None:
        if fmt != "fasta" and content == "fasta":
            line = _HEADER_LINE.search(src.text)
            number = src.text.count("\n", 0, line.start()) + 1 if line else 1
            raise InputError(src.name, f"format {fmt!r} was asked for, but line {number} starts with '>' "
                                       "as in FASTA; use fasta or leave the format out")
        if fmt == "fasta":
            return "fasta", None
        return fmt, _table_separator(src, "\t" if fmt == "tsv" else ",", asked=True)
    if content is None:
        if by_suffix in ("csv", "tsv"):
            # A one-column table; the column check says what is missing.
            return by_suffix, TABLE_SEPARATORS[src.suffix]
        first = _first_line(src.text)
        if first is None:
            raise InputError(src.name, "file is empty")
        number, text = first
        raise InputError(
            src.name,
            f"not FASTA: line {number} should start with '>' but reads {text[:40]!r}"
            + ("" if by_suffix == "fasta" else "; nor a table: it has no comma, tab, semicolon or '|'"),
        )
    if content == "fasta":
        if by_suffix not in (None, "fasta"):
            _warn(f"{src.name}: named {src.suffix} but holds FASTA (lines start with '>'); reading it as FASTA")
        return "fasta", None
    sep = _table_separator(src, TABLE_SEPARATORS.get(src.suffix))
    if by_suffix == "fasta":
        _warn(f"{src.name}: named {src.suffix} but holds a table (no line starts with '>'); reading it as a "
              f"table separated by {_SEP_NAMES.get(sep, repr(sep))}")
    return ("tsv" if sep == "\t" else "csv"), sep


def _table_separator(src: InputText, preferred: str | None, asked: bool = False) -> str:
    """``preferred`` unless it leaves the header one column while another delimiter splits it."""
    first = _first_line(src.text)
    if first is None:
        raise InputError(src.name, "file is empty")
    header = first[1]
    if preferred is not None and _split_header(header, preferred) > 1:
        return preferred
    sniffed = _sniff_delimiter(header)
    if sniffed is None:
        return preferred or ","
    if preferred is not None:
        origin = "format asked for" if asked else f"named {src.suffix}"
        _warn(f"{src.name}: {origin} (separator: {_SEP_NAMES.get(preferred, repr(preferred))}) but the header "
              f"is separated by {_SEP_NAMES[sniffed]}; reading it so")
    return sniffed


def detect_format(path: Path | str) -> str:
    """'fasta', 'csv' or 'tsv', from the content; a suffix that disagrees is logged as a warning."""
    return _choose_format(load_text(path), None)[0]


# ---------------------------------------------------------------------------------------------
# FASTA


def read_fasta(path: Path | str) -> list[Record]:
    return _parse_fasta(load_text(path))


def _parse_fasta(src: InputText) -> list[Record]:
    # A strict reader of our own rather than Biopython's SimpleFastaParser: that parser deletes
    # spaces inside sequence lines, skips every line before the first one that starts with '>'
    # (so " >P1" and its sequence vanish) and gives no line numbers, while this package must
    # judge the lines exactly as they are and say where a problem is.
    records: list[Record] = []
    header: tuple[int, str] | None = None  # (line number, text after '>')
    body: list[tuple[int, str, int]] = []  # (line number, stripped line, column of its first character)
    seen_content = False
    for number, line in enumerate(src.text.split("\n"), 1):
        stripped = line.strip(_ASCII_SPACE)
        if not stripped:
            continue
        seen_content = True
        if stripped.startswith(">"):
            if header is not None:
                records.append(_fasta_record(src.name, len(records) + 1, header, body))
            header, body = (number, stripped[1:]), []
        elif header is None:
            raise InputError(src.name, f"not FASTA: line {number} should start with '>' but reads {stripped[:40]!r}")
        else:
            body.append((number, stripped, len(line) - len(line.lstrip(_ASCII_SPACE)) + 1))
    if not seen_content:
        raise InputError(src.name, "file is empty")
    if header is not None:
        records.append(_fasta_record(src.name, len(records) + 1, header, body))
    return records


def _fasta_record(name: str, index: int, header: tuple[int, str], body: list[tuple[int, str, int]]) -> Record:
    line_no, title = header
    ident = title.split(maxsplit=1)[0] if title.strip() else ""
    where = f"record {index} (line {line_no}" + (f", id {ident!r})" if ident else ")")
    if not ident:
        raise InputError(name, "header has no ID", where)
    lines, start = [], 0
    for number, text, column in body:
        if _INNER_SPACE.search(text):
            raise InputError(name, f"whitespace inside the sequence on line {number}", where)
        lines.append((number, start, column))
        start += len(text)
    sequence = clean_sequence("".join(text for _, text, _ in body), name, where, lines=lines)
    return Record(ident, title.strip(), sequence, line_no)


# ---------------------------------------------------------------------------------------------
# Tables


@dataclass
class Table:
    """A delimited table read whole: the header and the rows, each with its line in the file."""

    name: str  # file name for messages
    sep: str  # the delimiter used
    columns: list[str]
    rows: list[list[str]]  # every row has len(columns) fields
    lines: list[int]  # line (as an editor numbers them; the header's line first) of each row
    header_line: int = 1

    def column_index(self, wanted: str, option: str | None = None) -> int:
        """Index of column ``wanted`` (exact name first, then ignoring case)."""
        if wanted in self.columns:
            return self.columns.index(wanted)
        matches = [i for i, c in enumerate(self.columns) if c.lower() == wanted.lower()]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise InputError(self.name, f"columns {[self.columns[i] for i in matches]} all match {wanted!r}"
                                        + (f"; pass {option} with the exact name" if option else ""))
        raise InputError(self.name, f"no column {wanted!r}; columns are {self.columns}")

    def column(self, wanted: str) -> list[str]:
        index = self.column_index(wanted)
        return [row[index] for row in self.rows]


def load_table(path: Path | str, sep: str | None = None) -> Table:
    """Read a delimited table; without ``sep`` the delimiter comes from the suffix and the header line."""
    src = load_text(path)
    return _parse_table(src, sep or _table_separator(src, TABLE_SEPARATORS.get(src.suffix)))


def _parse_table(src: InputText, sep: str) -> Table:
    first = _first_line(src.text)
    if first is None:
        raise InputError(src.name, "file is empty")
    if first[1].startswith(">"):
        raise InputError(src.name, f"holds FASTA (line {first[0]} starts with '>'), not a table")
    shown = _SEP_NAMES.get(sep, repr(sep))
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(src.text) + 1))  # one huge sequence is one huge field
    try:
        reader = csv.reader(io.StringIO(src.text, newline=""), delimiter=sep)
        columns: list[str] | None = None
        header_line = 0
        rows, lines = [], []
        done = 0  # lines consumed so far; a row starts on the next one
        for fields in reader:
            start, done = done + 1, reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip(_ASCII_SPACE)):
                continue
            if columns is None:
                columns, header_line = fields, start
                continue
            if len(fields) != len(columns):
                raise InputError(
                    src.name,
                    f"has {len(fields)} field{'s' if len(fields) != 1 else ''} separated by {shown} but the header "
                    f"(line {header_line}) has "
                    f"{len(columns)}; quote fields that contain the separator",
                    f"row {start}",
                )
            rows.append(fields)
            lines.append(start)
    except csv.Error as err:
        raise InputError(src.name, f"cannot be read as a table separated by {shown}: {err} "
                                   f"(near line {reader.line_num})") from None
    finally:
        csv.field_size_limit(limit)
    if columns is None:
        raise InputError(src.name, f"line {first[0]} holds no column names (it reads {first[1][:40]!r})")
    named = [c for c in columns if c]
    twice = sorted({c for c in named if named.count(c) > 1})
    if twice:
        raise InputError(src.name, f"column names appear more than once: {twice}")
    return Table(src.name, sep, columns, rows, lines, header_line)


def read_table(
    path: Path | str, id_col: str | None = None, seq_col: str | None = None, sep: str | None = None
) -> list[Record]:
    """Read a CSV/TSV with one protein per row. Column names are matched case-insensitively."""
    return table_records(load_table(path, sep), id_col, seq_col)


def table_records(table: Table, id_col: str | None = None, seq_col: str | None = None) -> list[Record]:
    id_index = _pick_column(table, id_col, ID_COLUMNS, "--id-col")
    seq_index = _pick_column(table, seq_col, SEQ_COLUMNS, "--seq-col")
    if not table.rows:
        raise InputError(table.name, "table has a header but no rows")
    records = []
    for row, fields in zip(table.lines, table.rows):
        ident = fields[id_index].strip()
        where = f"row {row}" + (f" (id {ident!r})" if ident else "")
        if not ident:
            raise InputError(table.name, f"empty ID in column {table.columns[id_index]!r}", where)
        if "\n" in fields[seq_index]:
            raise InputError(table.name, f"the {table.columns[seq_index]!r} field spans several lines "
                                         "(a quote left open?)", where)
        sequence = clean_sequence(fields[seq_index].strip(_ASCII_SPACE), table.name, where)
        records.append(Record(ident, ident, sequence, row))
    return records


def _pick_column(table: Table, wanted: str | None, candidates: tuple[str, ...], option: str) -> int:
    if wanted is not None:
        return table.column_index(wanted, option)
    lower = [c.lower() for c in table.columns]
    for name in candidates:
        if lower.count(name) > 1:
            matching = [c for c in table.columns if c.lower() == name]
            raise InputError(table.name, f"columns {matching} all match {name!r}; pass {option} with the exact name")
        if name in lower:
            return lower.index(name)
    shown = _SEP_NAMES.get(table.sep, repr(table.sep))
    hint = ""
    if len(table.columns) == 1:
        hint = f"; the header has one column when split at each {shown}: is the file delimited by something else?"
    raise InputError(
        table.name, f"cannot tell which column to use; pass {option} (columns are {table.columns}){hint}"
    )


# ---------------------------------------------------------------------------------------------


def read_sequences(
    path: Path | str,
    fmt: str | None = None,
    id_col: str | None = None,
    seq_col: str | None = None,
) -> list[Record]:
    """Read and validate every record; duplicate IDs must carry identical sequences."""
    if fmt not in (None, "fasta", "csv", "tsv"):
        raise InputError(path, f"unknown format {fmt!r} (use fasta, csv or tsv)")
    src = load_text(path)
    fmt, sep = _choose_format(src, fmt)
    if sep is None:
        records, unit = _parse_fasta(src), "line"
    else:
        records, unit = table_records(_parse_table(src, sep), id_col, seq_col), "row"
    if not records:
        raise InputError(src.name, "no records found")
    return drop_repeated_ids(records, src.name, unit=unit)


def drop_repeated_ids(records: list[Record], path: Path | str, *, unit: str = "line") -> list[Record]:
    """Keep the first of records that repeat an ID with the same sequence; refuse conflicts.

    ``unit`` names what ``Record.line`` counts in messages: "line" (FASTA) or "row" (tables).
    """
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
                f"duplicate ID {rec.id!r} with a different sequence than {_place(seen[0], seen[1], unit)}",
                _place(number, rec, unit),
            )
    if len(kept) < len(records):
        log.info("%s: %d repeated records (same ID and sequence) kept once", path, len(records) - len(kept))
    return kept


def _place(number: int, rec: Record, unit: str) -> str:
    if not rec.line:
        return f"record {number}"
    return f"row {rec.line}" if unit == "row" else f"record {number} ({unit} {rec.line})"
