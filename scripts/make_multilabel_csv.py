"""A multi-label location CSV (DeepLoc 2.0's layout) from UniProt's "Subcellular location [CC]" text.

Reads a UniProt table export with an ID column, a sequence column and the free-text
``Subcellular location [CC]`` column, maps every location it names to DeepLoc 2.0's ten
categories, and writes ``sid,<one 0/1 column per category>,Sequence``. Categories with
fewer than ``--min-count`` proteins are left out; proteins left with no category are left out
and counted.

Mapping: the top-level term of each location (the text before the first comma or
semicolon, evidence tags and ``Note=`` sections removed, isoform sections included) is
matched as a whole word at its start: Cytoplasm; Nucleus; Secreted and
Extracellular -> Extracellular; Cell membrane; Mitochondrion; Plastid and Chloroplast ->
Plastid; Endoplasmic reticulum; Golgi apparatus; Lysosome and Vacuole -> Lysosome/Vacuole;
Peroxisome. Other terms (chromosome, cytoplasmic vesicle, endosome, cell projection, an
unspecified membrane) fall outside the ten and are ignored. Every annotation counts, whatever its
evidence code (DeepLoc 2.0 kept experimental ones only; ``--experimental-only`` does that).

    python scripts/make_multilabel_csv.py ../shared/data/teaching/uniprot_protein_data_assigment.csv \\
        --id-col Entry --seq-col Sequence --out data/uniprot_multilabel.csv
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter
from pathlib import Path

CATEGORIES = {
    "Cytoplasm": ("Cytoplasm",),
    "Nucleus": ("Nucleus",),
    "Extracellular": ("Secreted", "Extracellular"),
    "Cell membrane": ("Cell membrane",),
    "Mitochondrion": ("Mitochondrion",),
    "Plastid": ("Plastid", "Chloroplast"),
    "Endoplasmic reticulum": ("Endoplasmic reticulum",),
    "Golgi apparatus": ("Golgi apparatus",),
    "Lysosome/Vacuole": ("Lysosome", "Vacuole"),
    "Peroxisome": ("Peroxisome",),
}
_EVIDENCE = re.compile(r"\{([^}]*)\}")
EXPERIMENTAL = "ECO:0000269"


def locations(text: str, experimental_only: bool = False) -> set[str]:
    """DeepLoc 2.0 categories named by one UniProt "Subcellular location [CC]" entry."""
    found: set[str] = set()
    body = text.replace("SUBCELLULAR LOCATION:", " ")
    body = re.sub(r"\[[^\]]*\]:", ". ", body)  # "[Isoform 2]:" opens a section like the first
    for part in re.split(r"\.\s+|\.$", body):
        part = part.strip()
        if not part or part.startswith("Note="):
            continue
        evidence = " ".join(_EVIDENCE.findall(part))
        if experimental_only and EXPERIMENTAL not in evidence:
            continue
        term = _EVIDENCE.sub("", part).strip()
        term = re.split(r"[,;]", term)[0].strip()
        for category, starts in CATEGORIES.items():
            # "Cytoplasmic vesicle" is not the cytoplasm: the name must end or go on with a space.
            if any(term == s or term.startswith(s + " ") for s in starts):
                found.add(category)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", type=Path)
    parser.add_argument("--id-col", default="Entry")
    parser.add_argument("--seq-col", default="Sequence")
    parser.add_argument("--location-col", default="Subcellular location [CC]")
    parser.add_argument("--min-count", type=int, default=30, help="Proteins a category needs to be kept.")
    parser.add_argument("--experimental-only", action="store_true", help="Only ECO:0000269 annotations.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    with open(args.table, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for column in (args.id_col, args.seq_col, args.location_col):
        if rows and column not in rows[0]:
            parser.error(f"{args.table}: no column {column!r}; columns are {list(rows[0])}")
    sets = [locations(r[args.location_col] or "", args.experimental_only) for r in rows]
    counts = Counter(c for s in sets for c in s)
    kept = [c for c in CATEGORIES if counts[c] >= args.min_count]
    out_rows, dropped = [], 0
    for row, labels in zip(rows, sets):
        labels = labels & set(kept)
        if not labels:
            dropped += 1
            continue
        out_rows.append({"sid": row[args.id_col], **{c: int(c in labels) for c in kept}, "Sequence": row[args.seq_col]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sid", *kept, "Sequence"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(out_rows)
    tmp.replace(args.out)
    per_protein = Counter(sum(r[c] for c in kept) for r in out_rows)
    print(f"{args.out}: {len(out_rows)} proteins, {len(kept)} labels; {dropped} proteins with none of them left out",
          file=sys.stderr)
    for c in CATEGORIES:
        state = "kept" if c in kept else f"left out (< {args.min_count})"
        print(f"  {c}: {counts[c]} ({state})", file=sys.stderr)
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(per_protein.items()))
    print(f"  labels per protein: {shown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
