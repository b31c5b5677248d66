"""Random single-protein reads: the cache's layout against one HDF5 dataset per protein.

    python scripts/bench_read.py demo/deeplocpro_subset_esm2_t6_8M_RANDOM_WEIGHTS.h5

Copies the cache's per-residue arrays into a second file with one dataset per protein
(bio_embeddings' layout), then times the same random sequence of reads on both; medians
of 5 rounds, rounds interleaved.
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
    with EmbeddingCache(args.cache) as cache, tempfile.TemporaryDirectory() as tmp:
        ids = cache.ids
        keys = [cache.key(i) for i in ids]
        per_protein = Path(tmp) / "per_protein.h5"
        with h5py.File(per_protein, "w") as out:
            for key, ident in zip(keys, ids):
                out[key] = cache.per_residue(ident)
        rng = np.random.default_rng(0)
        ours, theirs = [], []
        with h5py.File(per_protein, "r") as other:
            for _ in range(5):
                pick = rng.integers(0, len(ids), args.reads)
                start = time.perf_counter()
                for i in pick:
                    cache.per_residue(ids[i])
                ours.append((time.perf_counter() - start) / len(pick) * 1e6)
                start = time.perf_counter()
                for i in pick:
                    other[keys[i]][()]
                theirs.append((time.perf_counter() - start) / len(pick) * 1e6)
        info = cache.info()
        print(f"{len(ids)} proteins, mean {info['residues_stored'] / len(ids):.0f} residues x {info['embed_dim']} "
              f"{info['stored_dtype']}; {args.reads} random reads x 5 rounds")
        print(f"  concatenated + offsets (embedcache): {statistics.median(ours):6.0f} us per protein")
        print(f"  one dataset per protein            : {statistics.median(theirs):6.0f} us per protein "
              f"({statistics.median(theirs) / statistics.median(ours):.1f}x slower)")


if __name__ == "__main__":
    main()
