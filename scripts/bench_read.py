"""Random single-protein reads: the cache's layout against one HDF5 dataset per protein.

    python scripts/bench_read.py demo/deeplocpro_subset_esm2_t6_8M_RANDOM_WEIGHTS.h5

Copies the cache's per-residue arrays into a second file with one dataset per protein
(bio_embeddings' layout), then times the same random sequence of reads: the cache with
per-protein checksum verification (the default), the cache without it, and the
one-dataset-per-protein file; medians of 5 rounds, rounds interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from embedcache import EmbeddingCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--reads", type=int, default=2000)
    args = parser.parse_args()
    with EmbeddingCache(args.cache) as checked, EmbeddingCache(args.cache, verify=False) as unchecked, \
            tempfile.TemporaryDirectory() as tmp:
        ids = checked.ids
        keys = [checked.key(i) for i in ids]
        per_protein = Path(tmp) / "per_protein.h5"
        with h5py.File(per_protein, "w") as out:
            for key, ident in zip(keys, ids):
                out[key] = checked.per_residue(ident)
        rng = np.random.default_rng(0)
        times: dict[str, list[float]] = {"checked": [], "unchecked": [], "per_protein": []}
        with h5py.File(per_protein, "r") as other:
            readers = {
                "checked": lambda i: checked.per_residue(ids[i]),
                "unchecked": lambda i: unchecked.per_residue(ids[i]),
                "per_protein": lambda i: other[keys[i]][()],
            }
            for _ in range(5):
                pick = rng.integers(0, len(ids), args.reads)
                for name, read in readers.items():
                    start = time.perf_counter()
                    for i in pick:
                        read(i)
                    times[name].append((time.perf_counter() - start) / len(pick) * 1e6)
        med = {name: statistics.median(t) for name, t in times.items()}
        info = checked.info()
        print(f"{len(ids)} proteins, mean {info['residues_stored'] / len(ids):.0f} residues x {info['embed_dim']} "
              f"{info['stored_dtype']}; {args.reads} random reads x 5 rounds; format version {info['format_version']}"
              f"{'' if info['checksums'] else ' (no checksums)'}")
        print(f"  concatenated + offsets, checksum verified : {med['checked']:6.0f} us per protein")
        print(f"  concatenated + offsets, not verified      : {med['unchecked']:6.0f} us per protein "
              f"(verification adds {med['checked'] - med['unchecked']:.0f} us)")
        print(f"  one dataset per protein                   : {med['per_protein']:6.0f} us per protein "
              f"({med['per_protein'] / med['checked']:.1f}x the verified read)")


if __name__ == "__main__":
    main()
