"""Extraction throughput: fair-esm's extract.py path vs embedcache, same proteins, same threads.

    python scripts/bench_extract.py --threads 1 --shapes esm2_t6_8M_UR50D,esm2_t12_35M_UR50D

Models have random weights of the official shapes (speed does not depend on weight values).
Methods, each timed on the same proteins in the same process, repeats interleaved so that
machine noise hits all of them alike; medians are reported:

  (a) fair-esm   esm.FastaBatchedDataset, get_batch_indices(4096, extra_toks_per_seq=1), the
                 alphabet's batch converter truncating at 1022, ESM2.forward under no_grad,
                 per-token and mean representations cloned per protein (extract.py's loop
                 without its torch.save per protein).
  (b) embedcache the library's work plan and runner (embedcache.extract._Runner): SDPA
                 forward, residue slicing and mean pooling, at several budgets/precisions.

Achieved GFLOP/s counts the useful work (no padding): per layer 24*n*E^2 + 4*n^2*E for a
sequence of n tokens, against a dense matmul peak measured here in fp32 and bf16.
With --end-to-end FILE it also times `embedcache.extract` writing a real cache of FILE.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from embedcache.backbone import ESM2Backbone
from embedcache.batching import classify, plan_work
from embedcache.extract import ExtractConfig, _Runner, extract
from embedcache.models import ESM2_MODELS, random_esm2, save_esm2_checkpoint
from embedcache.sequences import read_sequences

DEFAULT_FASTA = Path(__file__).resolve().parents[2] / "shared/data/deeplocpro/graphpart_subset.fasta"
MAX_RESIDUES = 1022


def matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    return 2 * size**3 * done / (time.perf_counter() - start) / 1e9


def useful_gflop(lengths: list[int], layers: int, dim: int) -> float:
    total = 0.0
    for length in lengths:
        n = min(length, MAX_RESIDUES) + 2
        total += layers * (24 * n * dim * dim + 4 * n * n * dim)
    return total / 1e9


def run_fair_esm(model, alphabet, labels, seqs) -> float:
    from esm.data import FastaBatchedDataset

    dataset = FastaBatchedDataset(labels, seqs)
    batches = dataset.get_batch_indices(4096, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(
        dataset, collate_fn=alphabet.get_batch_converter(MAX_RESIDUES), batch_sampler=batches
    )
    layer = model.num_layers
    start = time.perf_counter()
    with torch.no_grad():
        for labels_, strs, toks in loader:
            out = model(toks, repr_layers=[layer], return_contacts=False)
            reps = {k: t.to("cpu") for k, t in out["representations"].items()}
            for i in range(len(labels_)):
                n = min(MAX_RESIDUES, len(strs[i]))
                _ = {k: t[i, 1 : n + 1].clone() for k, t in reps.items()}
                _ = {k: t[i, 1 : n + 1].mean(0).clone() for k, t in reps.items()}
    return time.perf_counter() - start


def run_embedcache(backbone: ESM2Backbone, seqs, budget: int) -> float:
    entries = [classify(str(i), s, MAX_RESIDUES, "truncate") for i, s in enumerate(seqs)]
    items = plan_work(entries, budget, backbone.extra_tokens, MAX_RESIDUES, 0)
    runner = _Runner(backbone, [backbone.num_layers], budget)
    start = time.perf_counter()
    for item in items:
        runner.run(item)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fasta", type=Path, default=DEFAULT_FASTA)
    parser.add_argument("--n", type=int, default=200, help="proteins (the first N of the file)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="esm2_t6_8M_UR50D,esm2_t12_35M_UR50D")
    parser.add_argument("--modes", default="fp32:4096,fp32:1024,bf16:1024,bf16:2048",
                        help="embedcache precision:budget pairs to time")
    parser.add_argument("--end-to-end", type=Path, help="also time a full `extract` of this FASTA (8M shape)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    records = read_sequences(args.fasta)[: args.n]
    labels = [r.id for r in records]
    seqs = [r.sequence for r in records]
    residues = sum(min(len(s), MAX_RESIDUES) for s in seqs)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"{len(seqs)} proteins from {args.fasta.name}, {residues} residues (truncated at {MAX_RESIDUES}); "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print(f"matmul peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s\n")
    modes = [(p, int(b)) for p, b in (m.split(":") for m in args.modes.split(","))]

    for shape in args.shapes.split(","):
        model = random_esm2(shape, seed=0)
        backbone = ESM2Backbone(model, model.alphabet, shape, shape)
        work = useful_gflop([len(s) for s in seqs], *ESM2_MODELS[shape][:2])
        times: dict[str, list[float]] = {"(a) fair-esm extract.py, fp32, 4096": []}
        for precision, budget in modes:
            times[f"(b) embedcache {precision}, {budget}"] = []
        for _ in range(args.repeats):
            times["(a) fair-esm extract.py, fp32, 4096"].append(run_fair_esm(model, model.alphabet, labels, seqs))
            for precision, budget in modes:
                backbone.set_precision(precision)
                times[f"(b) embedcache {precision}, {budget}"].append(run_embedcache(backbone, seqs, budget))
        base = statistics.median(times["(a) fair-esm extract.py, fp32, 4096"])
        print(f"{shape} (random weights), {work:.0f} useful GFLOP; median of {args.repeats}")
        print(f"  {'method, precision, token budget':42s} {'seconds':>8s} {'res/s':>8s} {'vs (a)':>7s} "
              f"{'GFLOP/s':>8s} {'of peak':>8s}")
        for name, ts in times.items():
            t = statistics.median(ts)
            peak = peak16 if "bf16" in name else peak32
            print(f"  {name:42s} {t:8.2f} {residues / t:8.0f} {base / t:6.2f}x {work / t:8.1f} {work / t / peak:7.0%}")
        print()

    if args.end_to_end:
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_esm2_checkpoint(random_esm2("esm2_t6_8M_UR50D"), Path(tmp) / "random_8M.pt")
            for precision, budget in [("fp32", 1024), ("bf16", 1024)]:
                out = Path(tmp) / f"cache_{precision}.h5"
                config = ExtractConfig(weights=str(weights), threads=args.threads, precision=precision,
                                       toks_per_batch=budget)
                start = time.perf_counter()
                summary = extract(args.end_to_end, out, config, progress=False)
                wall = time.perf_counter() - start
                print(f"end to end, {args.end_to_end.name}, 8M shape (random weights), {precision}, budget {budget}: "
                      f"{summary.unique_sequences} proteins, {summary.residues_embedded} residues, wall {wall:.1f} s "
                      f"({summary.residues_embedded / wall:.0f} res/s), file {out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    sys.exit(main())
