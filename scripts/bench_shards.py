"""Sharded extraction: one process with T threads against S shard processes with T/S threads each.

    python scripts/bench_shards.py                       # 1,131 DeepLocPro proteins, 2 threads, 2 shards
    python scripts/bench_shards.py --n 40 --repeats 1    # a quick check that it works
    python scripts/bench_shards.py --ray                 # also S Ray workers (extract --executor ray)

A random-weight model of the ESM-2 8M shape (speed does not depend on weight values) embeds the
first N proteins of the FASTA through the real command line, each configuration in fresh
processes, repeats interleaved so that machine noise hits all of them alike; medians:

  (a) one process     embedcache extract --threads T
  (b) S shards        S processes `extract --shard i/S --threads T/S` at once, then `embedcache merge`
  (c) Ray (--ray)     embedcache extract --executor ray --shards S --threads T/S (a local Ray instance,
                      started and stopped by the command, is part of its time)

Wall time counts everything a user waits for: start-up, reading, model load, embedding, writing,
and for (b) the merge. The per-shard overhead is measured on its own: a process's start-up
(importing embedcache and torch), loading the model, and the merge, each as a fraction of the
embedding time of one shard (as the shard processes report it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_FASTA = Path(__file__).resolve().parents[2] / "shared/data/deeplocpro/graphpart_subset.fasta"
SUMMARY = re.compile(r"embedded (\d+) now \((\d+) residues, ([\d.]+) s")


def run(args: list[str], env: dict) -> tuple[float, str]:
    """Wall seconds and output of one command; a failure stops the benchmark with its output."""
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return seconds, proc.stdout + proc.stderr


def embedded(output: str) -> tuple[int, float]:
    """(residues, embedding seconds) from an extract command's summary line."""
    match = SUMMARY.search(output)
    if match is None:
        sys.exit(f"no summary line in:\n{output}")
    return int(match.group(2)), float(match.group(3))


def one_process(cli, src: Path, out: Path, weights: Path, threads: int, env: dict) -> dict:
    wall, output = run([*cli, "extract", str(src), str(out), "--weights", str(weights), "--threads", str(threads),
                        "-q"], env)
    residues, embed = embedded(output)
    return {"wall": wall, "residues": residues, "embed": embed}


def shard_processes(cli, src: Path, work: Path, weights: Path, shards: int, threads: int, env: dict) -> dict:
    paths = [work / f"shard{i}.h5" for i in range(shards)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen([*cli, "extract", str(src), str(p), "--weights", str(weights), "--threads", str(threads),
                          "--shard", f"{i}/{shards}", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env)
        for i, p in enumerate(paths)
    ]
    outputs = [p.communicate()[0] for p in procs]
    shards_wall = time.perf_counter() - start
    for proc, output in zip(procs, outputs):
        if proc.returncode != 0:
            sys.exit(f"a shard failed:\n{output}")
    merge_wall, _ = run([*cli, "merge", *map(str, paths), str(work / "merged.h5")], env)
    parts = [embedded(o) for o in outputs]
    return {"wall": shards_wall + merge_wall, "residues": sum(r for r, _ in parts),
            "embed": max(e for _, e in parts), "embed_mean": statistics.mean(e for _, e in parts),
            "merge": merge_wall}


def ray_workers(cli, src: Path, out: Path, weights: Path, shards: int, threads: int, env: dict) -> dict:
    wall, output = run([*cli, "extract", str(src), str(out), "--weights", str(weights), "--threads", str(threads),
                        "--executor", "ray", "--shards", str(shards), "-q"], env)
    residues, _ = embedded(output)
    return {"wall": wall, "residues": residues}


def overheads(python: str, weights: Path, env: dict) -> dict:
    """A fresh process's start-up and its model load, timed inside that process."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "import embedcache.extract, embedcache.merge\n"
        "t1 = time.perf_counter()\n"
        "from embedcache.extract import ExtractConfig, load_backbone\n"
        f"load_backbone(ExtractConfig(weights={str(weights)!r}))\n"
        "print(t1 - t0, time.perf_counter() - t1)\n"
    )
    start = time.perf_counter()
    _, output = run([python, "-c", code], env)
    total = time.perf_counter() - start
    imports, load = (float(x) for x in output.split()[-2:])
    # What the interpreter takes before the first line runs counts as start-up too.
    return {"startup": total - load, "imports": imports, "load": load}


def max_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two caches' arrays; they must hold the same IDs and sequences."""
    import numpy as np

    from embedcache import EmbeddingCache

    worst = 0.0
    with EmbeddingCache(a) as ca, EmbeddingCache(b) as cb:
        if sorted(ca.ids) != sorted(cb.ids) or any(ca.sequence(i) != cb.sequence(i) for i in ca.ids):
            sys.exit(f"{a} and {b} hold different proteins")
        for ident in ca.ids:
            x, y = ca.per_residue(ident).astype(np.float64), cb.per_residue(ident).astype(np.float64)
            worst = max(worst, float(np.abs(x - y).max()))
        worst = max(worst, float(np.abs(ca.pooled(ca.ids).astype(np.float64) - cb.pooled(ca.ids)).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fasta", type=Path, default=DEFAULT_FASTA)
    parser.add_argument("--n", type=int, default=0, help="first N proteins (0: all)")
    parser.add_argument("--threads", type=int, default=2, help="threads in all, shared out among the shards")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="also Ray workers (needs embedcache[cluster])")
    args = parser.parse_args()
    if args.threads % args.shards:
        parser.error("--threads must be a multiple of --shards (each shard gets --threads/--shards)")
    per_shard = args.threads // args.shards

    import torch

    from embedcache.models import random_esm2, save_esm2_checkpoint

    python = sys.executable
    cli = [python, "-m", "embedcache"]
    env = dict(os.environ)
    # The child processes import this checkout's embedcache, as this script does.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        torch.set_num_threads(1)
        weights = save_esm2_checkpoint(random_esm2("esm2_t6_8M_UR50D"), tmp_path / "random_8M.pt")
        lines = args.fasta.read_text().splitlines()
        src = tmp_path / "in.fasta"
        if args.n:
            headers = [i for i, line in enumerate(lines) if line.startswith(">")]
            end = headers[args.n] if args.n < len(headers) else len(lines)
            src.write_text("\n".join(lines[:end]) + "\n")
        else:
            shutil.copy(args.fasta, src)
        n_proteins = sum(1 for line in src.read_text().splitlines() if line.startswith(">"))

        rows: dict[str, list[dict]] = {"one": [], "shards": [], "ray": [], "overhead": []}
        for repeat in range(args.repeats):
            work = tmp_path / f"r{repeat}"
            work.mkdir()
            rows["one"].append(one_process(cli, src, work / "one.h5", weights, args.threads, env))
            rows["shards"].append(shard_processes(cli, src, work, weights, args.shards, per_shard, env))
            if args.ray:
                rows["ray"].append(ray_workers(cli, src, work / "ray.h5", weights, args.shards, per_shard, env))
            rows["overhead"].append(overheads(python, weights, env))
            if repeat == 0:
                difference = max_difference(work / "one.h5", work / "merged.h5")
            shutil.rmtree(work)

    def med(name: str, field: str) -> float:
        return statistics.median(r[field] for r in rows[name])

    residues = rows["one"][0]["residues"]
    print(f"{n_proteins} proteins of {args.fasta.name} ({residues:,} residues after truncation at 1,022), "
          f"random ESM-2 8M weights, {args.threads} threads in all, medians of {args.repeats} interleaved repeats")
    print()
    print("| configuration | wall s | residues/s (wall) | vs one process | embedding s |")
    print("|---|---|---|---|---|")
    one = med("one", "wall")
    table = [(f"(a) 1 process x {args.threads} threads", "one"),
             (f"(b) {args.shards} shard processes x {per_shard} thread(s), then merge", "shards")]
    if args.ray:
        table.append((f"(c) Ray: {args.shards} workers x {per_shard} thread(s), local instance", "ray"))
    for label, name in table:
        wall = med(name, "wall")
        embed = f"{med(name, 'embed'):.1f}" if "embed" in rows[name][0] else "-"
        print(f"| {label} | {wall:.1f} | {residues / wall:,.0f} | {one / wall:.2f}x | {embed} |")
    print()
    embed_shard = med("shards", "embed_mean")
    startup, load, merge = med("overhead", "startup"), med("overhead", "load"), med("shards", "merge")
    print(f"Per shard, against its embedding time ({embed_shard:.1f} s, {per_shard} thread(s), "
          f"{residues / args.shards:,.0f} residues on average):")
    print(f"  process start-up (interpreter, embedcache, torch) {startup:.2f} s = {startup / embed_shard:.1%}")
    print(f"  model load                                        {load:.2f} s = {load / embed_shard:.1%}")
    print(f"  merge of the {args.shards} shards (a process of its own)     {merge:.2f} s = "
          f"{merge / embed_shard:.1%}")
    print(f"  embedding time, one process x {args.threads} vs {args.shards} shards x {per_shard}: "
          f"{med('one', 'embed'):.1f} s vs {med('shards', 'embed'):.1f} s (slowest shard) = "
          f"{med('one', 'embed') / med('shards', 'embed'):.2f}x")
    print(f"Merged shards vs one process: same proteins; largest difference of any stored value {difference:.1e} "
          "(float16 storage; batches differ, see embedcache.writer)")


if __name__ == "__main__":
    main()
