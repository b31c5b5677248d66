"""Time and peak memory of reading and planning a large FASTA: whole-file reading against the stream.

    python scripts/bench_input.py                      # 1,000,000 records of 50-300 residues
    python scripts/bench_input.py --records 50000      # a quick look first
    python scripts/bench_input.py --gzip               # the same input gzip-compressed

Writes a seeded synthetic FASTA (one line per sequence, every ID unique, 1% of the sequences
repeated under other IDs), then runs each way of reading it in a fresh Python process of its
own, so that peak memory (``ru_maxrss``) is that way's alone:

- ``whole``: what ``embedcache extract`` did before reading became a stream: the file read
  and decoded whole, every record kept with its sequence, an Entry (with its sequence) per
  unique sequence, then ``plan_work``.
- ``stream``: what it does now: ``open_input`` checks the bytes as a stream, ``index_input``
  keeps IDs, headers and keys and puts each unique sequence in a temporary file, then
  ``classify_spilled`` and ``plan_work``.

Both plan with ESM-2's CPU defaults (1,024 tokens per batch, max_length 1,022, truncate); the
script checks that both give the same work items. "RSS over start" subtracts the memory of a
process that has imported everything but read nothing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BUDGET, EXTRA_TOKENS, MAX_LENGTH, OVERLAP, POLICY = 1024, 2, 1022, 256, "truncate"


def write_fasta(path: Path, n: int, low: int, high: int, seed: int, compress: bool) -> tuple[int, int]:
    """n records of low..high residues; returns (records, residues)."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
    lengths = rng.integers(low, high + 1, n)
    residues = 0
    opener = gzip.open if compress else open
    with opener(path, "wb") as out:
        block = 10_000
        for start in range(0, n, block):
            lines = []
            stop = min(n, start + block)
            pool = letters[rng.integers(0, len(letters), int(lengths[start:stop].sum()))].tobytes()
            cut = 0
            previous = None
            for i in range(start, stop):
                length = int(lengths[i])
                if previous is not None and i % 100 == 99:  # a repeated sequence under another ID
                    seq = previous
                else:
                    seq = pool[cut : cut + length]
                cut += length
                residues += len(seq)
                previous = seq
                lines.append(b">synth%d synthetic protein %d of %d\n%s\n" % (i, i, n, seq))
            out.write(b"".join(lines))
    return n, residues


def plan_digest(items) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([[e.key for e in item.entries], item.windows]).encode())
    return digest.hexdigest()


def child(way: str, path: str) -> None:
    """Read and plan ``path`` one way; print a JSON line with the seconds, memory and plan."""
    from embedcache.batching import Status, classify, plan_work
    from embedcache.extract import classify_spilled, index_input
    from embedcache.sequences import SpilledSequences, _choose_format, _parse_fasta, drop_repeated_ids, load_text

    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if way == "whole":
        src = load_text(path)
        _choose_format(src, None)
        records = drop_repeated_ids(list(_parse_fasta(src)), src.name)
        unique = {}
        for rec in records:
            if rec.key not in unique:
                unique[rec.key] = classify(rec.key, rec.sequence, MAX_LENGTH, POLICY)
        n_records = len(records)
        spill_bytes = 0
    else:
        with SpilledSequences() as spill:
            records, spans = index_input(path, spill)
            unique = classify_spilled(spans, MAX_LENGTH, POLICY)
            n_records = len(records)
            spill_bytes = spill.size
    pending = [e for e in unique.values() if e.status != Status.SKIPPED]
    items = plan_work(pending, BUDGET, EXTRA_TOKENS, MAX_LENGTH, OVERLAP)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    print(json.dumps({"way": way, "records": n_records, "unique": len(unique), "items": len(items),
                      "seconds": seconds, "peak_rss_mb": peak / 1024, "start_rss_mb": start_rss / 1024,
                      "spill_mb": spill_bytes / 2**20, "plan": plan_digest(items)}))


def run_child(way: str, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, __file__, "--child", way, str(path)], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{way} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--min-length", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gzip", action="store_true", help="gzip the synthetic FASTA")
    parser.add_argument("--ways", default="whole,stream", help="comma-separated: whole, stream")
    parser.add_argument("--dir", help="where the FASTA is written [a temporary directory, removed after]")
    parser.add_argument("--child", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / ("synthetic.fasta" + (".gz" if args.gzip else ""))
        start = time.perf_counter()
        n, residues = write_fasta(path, args.records, args.min_length, args.max_length, args.seed, args.gzip)
        size = path.stat().st_size
        print(f"{path.name}: {n:,} records, {residues:,} residues, {size / 2**20:,.1f} MiB on disk "
              f"(written in {time.perf_counter() - start:.1f} s)")
        results = [run_child(way, path) for way in args.ways.split(",")]
    print(f"{'way':8s} {'seconds':>9s} {'peak RSS MiB':>13s} {'RSS over start MiB':>19s} {'spilled MiB':>12s} "
          f"{'work items':>11s}")
    for r in results:
        over = r["peak_rss_mb"] - r["start_rss_mb"]
        print(f"{r['way']:8s} {r['seconds']:9.1f} {r['peak_rss_mb']:13.0f} {over:19.0f} {r['spill_mb']:12.0f} "
              f"{r['items']:11,d}")
    plans = {r["plan"] for r in results}
    print("same work plan: " + ("yes" if len(plans) == 1 else "NO"))
    if len(results) == 2:
        a, b = results
        print(f"{b['way']} / {a['way']}: time x{b['seconds'] / a['seconds']:.2f}, memory over start "
              f"x{(b['peak_rss_mb'] - b['start_rss_mb']) / max(1e-9, a['peak_rss_mb'] - a['start_rss_mb']):.2f}")
    if len(plans) != 1:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
