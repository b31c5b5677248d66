"""Reading protein sequences from FASTA or CSV/TSV, validating them, and keying them by content.

Every problem found in the input is reported as an :class:`InputError` naming the file,
the record and the problem, before any output is written. The path ``-`` reads standard input
(the string ``"./-"`` names a file called ``-``).

The input is judged as it is: nothing is changed before it is validated. A file (or ``-``,
standard input, read once into a temporary file) is read as a stream, twice: once to check
its bytes and find its first line, then to parse it, so that memory does not grow with its
size (:func:`iter_sequences`, :func:`index_sequences`); gzip, bzip2 and xz are recognised by
their magic bytes, whatever the name; a UTF-8 byte-order mark is skipped; anything else that is not UTF-8
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
import contextlib
import csv
import functools
import gzip
import hashlib
import io
import logging
import lzma
import os
import re
import shutil
import stat
import sys
import tempfile
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
AMBIGUOUS = "BZJUOX"
ALPHABET = frozenset(AMINO_ACIDS + AMBIGUOUS)

FASTA_SUFFIXES = {".fasta", ".fa", ".faa", ".fas", ".fsa", ".pep", ".aa"}
TABLE_SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
# Checked in this order; on a tie in the number of header fields the first wins.
DELIMITERS = (",", "\t", ";", "|")
_SEP_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "'|'"}
ID_COLUMNS = ("id", "entry", "accession", "name", "protein_id", "uniprot_id", "sid")
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

    @functools.cached_property
    def first(self) -> tuple[int, str] | None:
        """(line number, stripped text) of the first line that is not blank."""
        return _first_line(self.text)

    @functools.cached_property
    def header_line(self) -> int | None:
        """Number of the first line that starts with '>' (after spaces or tabs), if any."""
        found = _HEADER_LINE.search(self.text)
        return self.text.count("\n", 0, found.start()) + 1 if found else None

    def lines(self) -> Iterator[str]:
        """The lines, each with its "\n" (the last one without, when the text does not end with one)."""
        return iter(io.StringIO(self.text, newline=""))


@dataclass(frozen=True)
class InputStream:
    """An input checked as a stream (:func:`open_input`) and read again, as a stream, by ``lines()``.

    The first pass decompressed and decoded every byte, so encoding problems are reported
    before any record is parsed, as with :class:`InputText`.
    """

    name: str
    suffix: str
    compression: str | None
    first: tuple[int, str] | None
    header_line: int | None
    source: _RawSource
    identity: tuple  # the file's (device, inode, size, mtime) when first read: it must not change

    def lines(self) -> Iterator[str]:
        yield from _text_lines(self.name, self.source)
        if self.identity and self.source.identity() != self.identity:
            raise InputError(self.name, "changed while it was being read; read it again once it is complete")


@dataclass(frozen=True)
class _RawSource:
    """Where an input's raw (perhaps compressed) bytes are read from the start, as often as needed."""

    path: Path | None = None  # a regular file
    spill: IO[bytes] | None = None  # or its copy: standard input, a FIFO or a device can be read once

    def open(self) -> io.IOBase:
        if self.spill is not None:
            return _PositionalReader(self.spill.fileno())
        assert self.path is not None
        try:
            return open(self.path, "rb")
        except OSError as err:
            raise InputError(self.path, f"cannot be read: {err.strerror or err}") from None

    def identity(self) -> tuple:
        if self.path is None:
            return ()
        info = os.stat(self.path)
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


_stdin_data: IO[bytes] | None = None
_warned: set[str] = set()


def _warn(message: str) -> None:
    """Log a warning about an input once: detecting and reading the same file must not repeat it."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _stdin_spill() -> IO[bytes]:
    """Standard input, copied the first time into a temporary file (deleted at exit) and kept, so
    that detecting and reading, and both passes of a streamed read, see the same bytes."""
    global _stdin_data
    if _stdin_data is None:
        stream = sys.stdin
        if stream is None:
            raise InputError(STDIN_NAME, "there is no standard input to read")
        if stream.isatty():
            raise InputError(STDIN_NAME, "standard input is a terminal; pipe or redirect a file into it")
        spill = tempfile.TemporaryFile(prefix="embedcache-stdin-")  # noqa: SIM115  (kept for the process)
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            shutil.copyfileobj(buffer, spill, _CHUNK)
        else:
            while text := stream.read(_CHUNK):
                spill.write(text.encode("utf-8"))
        spill.flush()
        _stdin_data = spill
    return _stdin_data


def _stdin_bytes() -> bytes:
    spill = _stdin_spill()
    return _PositionalReader(spill.fileno()).read()


class _PositionalReader(io.RawIOBase):
    """Reads a file descriptor from its start with ``pread``, sharing no offset with other readers."""

    def __init__(self, fd: int):
        self.fd, self.pos = fd, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = os.pread(self.fd, len(buffer), self.pos)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


# Bytes decoded at a time: the stream's memory is a few times this, whatever the input's size.
_CHUNK = 1 << 18


def read_file_bytes(path: Path, what: str = "a FASTA or CSV/TSV file", regular_only: bool = False) -> bytes:
    """The bytes of ``path``, or an InputError naming it: missing (or a broken link), unreadable,
    a directory, or with ``regular_only`` anything but a regular file (opening a FIFO would wait
    for a writer for ever)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise InputError(path, f"file not found (broken symbolic link to {os.readlink(path)})") from None
        raise InputError(path, "file not found") from None
    except OSError as err:
        raise InputError(path, f"cannot be read: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(path, f"is a directory; give {what}")
    if regular_only and not stat.S_ISREG(info.st_mode):
        raise InputError(path, f"is not a regular file (a pipe, FIFO or device); give {what}")
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


class _Prefixed:
    """A stream with some bytes already read from it put back in front."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if self.head:
            if size is None or size < 0:
                data, self.head = self.head + self.stream.read(), b""
                return data
            data, self.head = self.head[:size], self.head[size:]
            return data
        return self.stream.read(size)


class _Layer:
    """One decompression layer; its errors become an InputError naming the layer, as whole-file reading does."""

    def __init__(self, name: str, stream, described: str):
        self.name, self.stream, self.described = name, stream, described

    def read(self, size: int = -1) -> bytes:
        try:
            return self.stream.read(size)
        except InputError:
            raise
        except (EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as err:
            if isinstance(err, EOFError) or "ended before the end-of-stream" in str(err):
                raise InputError(self.name, f"truncated {self.described} data: the file ends before the compressed "
                                            "stream does (an interrupted download or copy?)") from None
            raise InputError(self.name, f"corrupt {self.described} data ({err})") from None


_STREAM_OPENERS = {
    # Closed with the raw file they read (a with-block in _text_lines and open_input).
    "gzip": lambda s: gzip.GzipFile(fileobj=s, mode="rb"),
    "bz2": lambda s: bz2.BZ2File(s),
    "xz": lambda s: lzma.LZMAFile(s),  # noqa: SIM115
}


def _read_up_to(stream, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = stream.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _decompressing(name: str, raw) -> tuple[object, str | None]:
    """The stream inside any gzip/bz2/xz layers, and the layers' names; refuses archives and the like."""
    layers: list[str] = []
    stream = raw
    for _ in range(4):
        head = _read_up_to(stream, 16)
        stream = _Prefixed(head, stream)
        found = next((entry for entry in _DECOMPRESSORS if entry[1](head)), None)
        if found is None:
            break
        kind = found[0]
        stream = _Layer(name, _STREAM_OPENERS[kind](stream), "-inside-".join([kind, *reversed(layers)]))
        layers.append(kind)
    head = _read_up_to(stream, 512)
    for matches, problem in _REFUSED:
        if matches(head):
            raise InputError(name, problem)
    return _Prefixed(head, stream), "-inside-".join(reversed(layers)) or None


def _decode_stream(name: str, stream, compression: str | None) -> Iterator[str]:
    """Lines of UTF-8 text, checked as :func:`_decode` checks a whole file, with the same messages.

    Bytes are decoded in blocks that end at a line break, so no character is split; a block
    that ends with CR waits for the next, which may start with its LF.
    """
    after = f" of the {compression}-decompressed data" if compression else ""
    base = 0  # offset of the chunk in the decompressed data
    newlines = 0  # LFs before the chunk
    line_start = 0  # offset of the byte after the last LF before the chunk
    skip = None  # bytes of a UTF-8 byte-order mark to skip, once the start has been seen
    pending: list[bytes] = []  # read, not yet decoded: no line break in them but perhaps a final CR
    eof = False
    while not eof:
        # The first read returns _decompressing's head (512 bytes or the whole input), enough for any mark.
        block = stream.read(_CHUNK)
        eof = not block
        if not eof and b"\n" not in block and b"\r" not in block:
            pending.append(block)
            continue
        data = b"".join([*pending, block])
        pending = []
        if skip is None:
            for bom, encoding in _WIDE_BOMS:
                if data.startswith(bom):
                    raise InputError(name, f"{encoding} text; save it as UTF-8")
            skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        if eof:
            chunk = data
        else:
            cut = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1
            if cut == 0:  # only a CR at the very end, which may be followed by its LF
                pending.append(data)
                continue
            chunk = data[:cut]
            if cut < len(data):
                pending.append(data[cut:])

        def where(pos: int, chunk: bytes = chunk, base: int = base, newlines: int = newlines,
                  line_start: int = line_start) -> str:
            last = chunk.rfind(b"\n", 0, pos)
            column = pos - last if last >= 0 else base + pos - line_start + 1
            line = newlines + chunk.count(b"\n", 0, pos) + 1
            return f"byte offset {base + pos}{after} (line {line}, byte {column} of the line)"

        nul = chunk.find(b"\x00", skip)
        if nul >= 0:
            raise InputError(name, f"NUL byte at {where(nul)}: not a text file, or UTF-16/32 text without "
                                   "a byte-order mark; save it as UTF-8 text")
        try:
            text = chunk[skip:].decode("utf-8")
        except UnicodeDecodeError as err:
            pos = err.start + skip
            raise InputError(name, f"not UTF-8 text: byte 0x{chunk[pos]:02X} at {where(pos)} is not valid "
                                   "UTF-8 (Latin-1 or Windows-1252?); save the file as UTF-8") from None
        skip = 0
        pieces = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for piece in pieces[:-1]:
            yield piece + "\n"
        if pieces[-1]:
            yield pieces[-1]  # only the input's end can fall inside a line
        last = chunk.rfind(b"\n")
        if last >= 0:
            line_start = base + last + 1
        newlines += chunk.count(b"\n")
        base += len(chunk)


def _text_lines(name: str, source: _RawSource) -> Iterator[str]:
    with source.open() as raw:
        stream, compression = _decompressing(name, raw)
        yield from _decode_stream(name, stream, compression)


def open_input(path: Path | str) -> InputStream:
    """Check ``path`` (``-``: standard input) as a stream: every byte decompressed and decoded, its first
    line and first header line found. Memory stays constant; :meth:`InputStream.lines` reads it again."""
    if str(path) == STDIN:
        name, suffix = STDIN_NAME, ""
        source = _RawSource(spill=_stdin_spill())
    else:
        name, suffix = str(path), _format_suffix(str(path))
        if stat.S_ISREG(_check_readable(Path(path)).st_mode):
            source = _RawSource(path=Path(path))
        else:
            # A FIFO or device (process substitution, /dev/stdin) can be read once: copied to be read twice.
            spill = tempfile.TemporaryFile(prefix="embedcache-input-")  # noqa: SIM115  (lives as long as the input)
            try:
                with open(path, "rb") as handle:
                    shutil.copyfileobj(handle, spill, _CHUNK)
                spill.flush()
            except OSError as err:
                spill.close()
                raise InputError(path, f"cannot be read: {err.strerror or err}") from None
            source = _RawSource(spill=spill)
    identity = source.identity()
    first: tuple[int, str] | None = None
    header: int | None = None
    with source.open() as raw:
        stream, compression = _decompressing(name, raw)
        for number, line in enumerate(_decode_stream(name, stream, compression), 1):
            if first is None:
                stripped = line.strip(_ASCII_SPACE)
                if stripped:
                    first = (number, stripped)
            if header is None and line.lstrip(" \t").startswith(">"):
                header = number
    return InputStream(name, suffix, compression, first, header, source, identity)


def _check_readable(path: Path) -> os.stat_result:
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
    return info


def load_text(path: Path | str) -> InputText:
    """Read ``path`` (``-``: standard input) whole: decompress by magic bytes, decode UTF-8, refuse the rest."""
    if str(path) == STDIN:
        name, data, suffix = STDIN_NAME, _stdin_bytes(), ""
    else:
        path = Path(path)
        name, data, suffix = str(path), read_file_bytes(path), _format_suffix(str(path))
    return text_of_bytes(name, data, suffix)


def text_of_bytes(name: str, data: bytes, suffix: str = "") -> InputText:
    """:func:`load_text` of bytes already read: for a caller that also hashes exactly what it parses."""
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


def _content_format(src: InputText | InputStream) -> str | None:
    """'fasta', 'table' or None (neither), from the content alone."""
    first = src.first
    if first is None:
        raise InputError(src.name, "file is empty")
    # Any line starting with '>' means FASTA, even after stray text (which read_fasta reports);
    # no table has a line that starts with '>'.
    if first[1].startswith(">") or src.header_line is not None:
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


def _choose_format(src: InputText | InputStream, fmt: str | None) -> tuple[str, str | None]:
    """('fasta', None) or ('csv'|'tsv', delimiter): ``fmt`` when given (checked against the content),
    else the content; a suffix that disagrees is logged."""
    content = _content_format(src)
    by_suffix = _suffix_format(src.suffix)
    if fmt is not None:
        if fmt != "fasta" and content == "fasta":
            number = src.header_line or 1
            raise InputError(src.name, f"format {fmt!r} was asked for, but line {number} starts with '>' "
                                       "as in FASTA; use fasta or leave the format out")
        if fmt == "fasta":
            return "fasta", None
        return fmt, _table_separator(src, "\t" if fmt == "tsv" else ",", asked=True)
    if content is None:
        if by_suffix in ("csv", "tsv"):
            # A one-column table; the column check says what is missing.
            return by_suffix, TABLE_SEPARATORS[src.suffix]
        first = src.first
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


def _table_separator(src: InputText | InputStream, preferred: str | None, asked: bool = False) -> str:
    """``preferred`` unless it leaves the header one column while another delimiter splits it."""
    first = src.first
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
    return list(_parse_fasta(load_text(path)))


def _parse_fasta(src: InputText | InputStream) -> Iterator[Record]:
    # A strict reader of our own rather than Biopython's SimpleFastaParser: that parser deletes
    # spaces inside sequence lines, skips every line before the first one that starts with '>'
    # (so " >P1" and its sequence vanish) and gives no line numbers, while this package must
    # judge the lines exactly as they are and say where a problem is.
    count = 0
    header: tuple[int, str] | None = None  # (line number, text after '>')
    body: list[tuple[int, str, int]] = []  # (line number, stripped line, column of its first character)
    seen_content = False
    for number, line in enumerate(src.lines(), 1):
        stripped = line.strip(_ASCII_SPACE)
        if not stripped:
            continue
        seen_content = True
        if stripped.startswith(">"):
            if header is not None:
                count += 1
                yield _fasta_record(src.name, count, header, body)
            header, body = (number, stripped[1:]), []
        elif header is None:
            raise InputError(src.name, f"not FASTA: line {number} should start with '>' but reads {stripped[:40]!r}")
        else:
            body.append((number, stripped, len(line) - len(line.lstrip(_ASCII_SPACE)) + 1))
    if not seen_content:
        raise InputError(src.name, "file is empty")
    if header is not None:
        yield _fasta_record(src.name, count + 1, header, body)


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
    first = src.first
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
    id_index = pick_column(table, id_col, ID_COLUMNS, "--id-col")
    seq_index = pick_column(table, seq_col, SEQ_COLUMNS, "--seq-col")
    if not table.rows:
        raise InputError(table.name, "table has a header but no rows")
    return [_table_record(table.name, table.columns, id_index, seq_index, row, fields)
            for row, fields in zip(table.lines, table.rows)]


def _table_record(name: str, columns: list[str], id_index: int, seq_index: int, row: int, fields: list[str]) -> Record:
    ident = fields[id_index].strip()
    where = f"row {row}" + (f" (id {ident!r})" if ident else "")
    if not ident:
        raise InputError(name, f"empty ID in column {columns[id_index]!r}", where)
    if "\n" in fields[seq_index]:
        raise InputError(name, f"the {columns[seq_index]!r} field spans several lines (a quote left open?)", where)
    sequence = clean_sequence(fields[seq_index].strip(_ASCII_SPACE), name, where)
    return Record(ident, ident, sequence, row)


def _stream_table(src: InputStream, sep: str, id_col: str | None, seq_col: str | None) -> Iterator[Record]:
    """The records of a table read as a stream, its problems reported in the order whole-file
    reading reports them: the table's shape (anywhere in it) first, then its columns, then its rows.

    Records are yielded as they are read; a problem found after them is raised at the end, so
    nothing may be acted on before the iteration is complete.
    """
    first = src.first
    if first is None:
        raise InputError(src.name, "file is empty")
    if first[1].startswith(">"):
        raise InputError(src.name, f"holds FASTA (line {first[0]} starts with '>'), not a table")
    shown = _SEP_NAMES.get(sep, repr(sep))
    limit = csv.field_size_limit()
    columns: list[str] | None = None
    header_line = 0
    column_problem: InputError | None = None  # raised once the whole table's shape is known to be sound
    row_problem: InputError | None = None
    rows = 0
    indices = (0, 0)
    try:
        csv.field_size_limit(2**31 - 1)  # one huge sequence is one huge field
        reader = csv.reader(src.lines(), delimiter=sep)
        done = 0  # lines consumed so far; a row starts on the next one
        try:
            for fields in reader:
                start, done = done + 1, reader.line_num
                if not fields or (len(fields) == 1 and not fields[0].strip(_ASCII_SPACE)):
                    continue
                if columns is None:
                    columns, header_line = fields, start
                    try:
                        indices = _stream_columns(src.name, sep, columns, id_col, seq_col)
                    except InputError as err:
                        column_problem = err
                    continue
                if len(fields) != len(columns):
                    raise InputError(
                        src.name,
                        f"has {len(fields)} field{'s' if len(fields) != 1 else ''} separated by {shown} but the "
                        f"header (line {header_line}) has "
                        f"{len(columns)}; quote fields that contain the separator",
                        f"row {start}",
                    )
                rows += 1
                if column_problem is None and row_problem is None:
                    try:
                        record = _table_record(src.name, columns, *indices, start, fields)
                    except InputError as err:
                        row_problem = err
                    else:
                        yield record
        except csv.Error as err:
            raise InputError(src.name, f"cannot be read as a table separated by {shown}: {err} "
                                       f"(near line {reader.line_num})") from None
    finally:
        csv.field_size_limit(limit)
    if columns is None:
        raise InputError(src.name, f"line {first[0]} holds no column names (it reads {first[1][:40]!r})")
    if column_problem is not None:
        raise column_problem
    if not rows:
        raise InputError(src.name, "table has a header but no rows")
    if row_problem is not None:
        raise row_problem


def _stream_columns(name: str, sep: str, columns: list[str], id_col: str | None,
                    seq_col: str | None) -> tuple[int, int]:
    """The ID and sequence columns' indices, checked as :func:`_parse_table` and :func:`table_records` check them."""
    named = [c for c in columns if c]
    twice = sorted({c for c in named if named.count(c) > 1})
    if twice:
        raise InputError(name, f"column names appear more than once: {twice}")
    table = Table(name, sep, columns, [], [])
    return (pick_column(table, id_col, ID_COLUMNS, "--id-col"), pick_column(table, seq_col, SEQ_COLUMNS, "--seq-col"))


def pick_column(table: Table, wanted: str | None, candidates: tuple[str, ...], option: str) -> int:
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
    return list(iter_sequences(path, fmt, id_col, seq_col))


def iter_sequences(
    path: Path | str,
    fmt: str | None = None,
    id_col: str | None = None,
    seq_col: str | None = None,
) -> Iterator[Record]:
    """:func:`read_sequences` as a stream: memory holds one record, and each ID with its sequence's key.

    Problems are the ones ``read_sequences`` reports, in its order; one found after some records
    were yielded (a conflicting duplicate ID, a bad row after a good one in a table whose
    shape is broken further on) is raised when the iteration ends, so act on the records only
    once it is complete.
    """
    for rec, _ in iter_keyed(path, fmt, id_col, seq_col):
        yield rec


def iter_keyed(
    path: Path | str,
    fmt: str | None = None,
    id_col: str | None = None,
    seq_col: str | None = None,
) -> Iterator[tuple[Record, str]]:
    """:func:`iter_sequences` with each record's key (``Record.key`` hashes the sequence on every call)."""
    if fmt not in (None, "fasta", "csv", "tsv"):
        raise InputError(path, f"unknown format {fmt!r} (use fasta, csv or tsv)")
    src = open_input(path)
    fmt, sep = _choose_format(src, fmt)
    unit = "line" if sep is None else "row"
    first: dict[str, str] = {}  # ID -> key of its first record (the caller's index holds the same strings)
    conflict: tuple[int, Record] | None = None
    number = repeated = 0
    for number, rec in enumerate(_records(src, sep, id_col, seq_col), 1):
        key = sequence_key(rec.sequence)
        seen = first.get(rec.id)
        if seen is None:
            first[rec.id] = key
            yield rec, key
            continue
        repeated += 1
        if seen != key and conflict is None:
            conflict = (number, rec)
    if not number:
        raise InputError(src.name, "no records found")
    if conflict is not None:
        number, rec = conflict
        # Where the ID first appeared is looked up only now: rare, and not worth memory per record.
        earlier = next((n, r) for n, r in enumerate(_records(src, sep, id_col, seq_col), 1) if r.id == rec.id)
        raise InputError(
            src.name,
            f"duplicate ID {rec.id!r} with a different sequence than {_place(*earlier, unit)}",
            _place(number, rec, unit),
        )
    if repeated:
        log.info("%s: %d repeated records (same ID and sequence) kept once", src.name, repeated)


def _records(src: InputStream, sep: str | None, id_col: str | None, seq_col: str | None) -> Iterator[Record]:
    return _parse_fasta(src) if sep is None else _stream_table(src, sep, id_col, seq_col)


@dataclass(frozen=True)
class IndexedRecord:
    """A record without its sequence: what a cache's ID tables need of it."""

    id: str
    header: str
    key: str  # content address of the sequence (sequence_key)


class RecordIndex:
    """Every record's ID, header and key, in input order, as three lists (no object per record)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.headers: list[str] = []
        self.keys: list[str] = []

    def append(self, ident: str, header: str, key: str) -> None:
        self.ids.append(ident)
        # A table's header is its ID: one string for both.
        self.headers.append(ident if header == ident else header)
        self.keys.append(key)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> IndexedRecord:
        return IndexedRecord(self.ids[i], self.headers[i], self.keys[i])

    def __iter__(self) -> Iterator[IndexedRecord]:
        for ident, header, key in zip(self.ids, self.headers, self.keys):
            yield IndexedRecord(ident, header, key)


class SpilledSequences:
    """Sequences written once to an unnamed temporary file and read back by offset when needed.

    The file lives in ``directory`` (default: the system's temporary directory, ``$TMPDIR``) and
    disappears when closed or when the process ends, however it ends.
    """

    def __init__(self, directory: Path | str | None = None):
        self.directory = Path(directory or tempfile.gettempdir())
        self._file = tempfile.TemporaryFile(prefix="embedcache-sequences-", dir=self.directory)  # noqa: SIM115
        self._end = 0
        self._dirty = False

    def _no_space(self, err: OSError) -> OSError:
        from .atomic import DiskFullError, format_bytes, is_no_space

        if not is_no_space(err):
            return err
        free = shutil.disk_usage(self.directory).free
        return DiskFullError(
            err.errno, f"{self.directory}: the disk is full ({format_bytes(free)} free; or a quota or file-size "
                       f"limit was reached) while keeping the input's sequences in a temporary file there "
                       f"({format_bytes(self._end)} so far); nothing was written. Free some space and run the same "
                       "command again")

    def add(self, sequence: str) -> int:
        """Store a (validated, ASCII) sequence; returns its offset."""
        data = sequence.encode("ascii")
        try:
            self._file.write(data)
        except OSError as err:
            raise self._no_space(err) from None
        offset, self._end, self._dirty = self._end, self._end + len(data), True
        return offset

    def flush(self) -> None:
        """Write out what is buffered: a full disk shows here, not in the middle of a run."""
        if self._dirty:
            try:
                self._file.flush()
            except OSError as err:
                raise self._no_space(err) from None
            self._dirty = False

    def read(self, offset: int, length: int) -> str:
        self.flush()
        data = os.pread(self._file.fileno(), length, offset)
        if len(data) != length:
            raise OSError(f"the temporary copy of the input's sequences lost data at offset {offset}")
        return data.decode("ascii")

    @property
    def size(self) -> int:
        return self._end

    def close(self) -> None:
        # What is still buffered is of no use to anyone: a full disk must not fail the closing.
        with contextlib.suppress(OSError):
            self._file.close()

    def __enter__(self) -> SpilledSequences:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
