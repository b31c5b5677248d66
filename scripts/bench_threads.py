"""Thread counts on an idle and on a busy machine: 1, 2 and the default, OpenMP's wait policies.

    python scripts/bench_threads.py --n 100 --repeats 3
    python scripts/bench_threads.py --n 10 --repeats 1 --policies auto --models esm2_8M   # a quick check

Each configuration runs `embedcache.extract` in a fresh Python process (OpenMP reads
OMP_WAIT_POLICY once, when torch starts), on the first N proteins of the DeepLocPro subset,
with models of random weights in the official 8M shape (speed does not depend on weight
values) and UniRep-256 when its weights are found ($UNIREP_WEIGHTS_DIR, else
../shared/models/unirep). Conditions:

  idle   nothing else runs (as far as this script can tell)
  busy   this script keeps one core busy with a spinning process of its own

Threads: 1, 2 and the default (``embedcache.threads.default_threads``, decided in the child
with the spinner running); wait policies: auto (what `embedcache extract` does: PASSIVE
when other processes hold a core, else left unset), unset (libgomp's default: spin a while,
then sleep), passive, active. Repeats are interleaved (every configuration once, then again) so
that changes in the machine's load hit all alike. Reported: median residues/s of the
embedding (model loading excluded), and per model and condition the default's speed against
the best fixed choice.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_FASTA = HERE.parents[1] / "shared/data/deeplocpro/graphpart_subset.fasta"
UNIREP_DIR = Path(os.environ.get("UNIREP_WEIGHTS_DIR") or HERE.parents[1] / "shared/models/unirep")

CHILD = r"""
import json, sys, logging
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
args = json.loads(sys.argv[1])
if args["policy"] == "auto":
    from embedcache.threads import prepare_openmp
    prepare_openmp()  # as the command lines do, before torch starts
from embedcache.extract import ExtractConfig, extract
config = ExtractConfig(model=args["model"], weights=args["weights"], threads=args["threads"],
                       precision=args["precision"])
summary = extract(args["fasta"], args["out"], config, progress=False)
import torch
print(json.dumps({"residues": summary.residues_embedded, "seconds": summary.seconds,
                  "threads": torch.get_num_threads()}))
"""


def spin() -> None:
    while True:
        pass


def run_child(model: dict, threads: int | None, policy: str, precision: str, fasta: Path, tmp: Path) -> dict:
    out = tmp / "cache.h5"
    for leftover in (out, tmp / "cache.h5.parts"):
        if leftover.is_dir():
            import shutil

            shutil.rmtree(leftover)
        elif leftover.exists():
            leftover.unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if policy not in ("unset", "auto"):
        env["OMP_WAIT_POLICY"] = policy.upper()
    env["UNIREP_WEIGHTS_DIR"] = str(UNIREP_DIR)
    args = {"model": model.get("model"), "weights": model.get("weights"), "threads": threads, "policy": policy,
            "precision": precision, "fasta": str(fasta), "out": str(out)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({model['name']}, threads {threads}, {policy}):\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    choice = [line for line in proc.stderr.splitlines() if "CPU threads:" in line]
    result["choice"] = choice[-1].split("CPU threads: ", 1)[1] if choice else ""
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fasta", type=Path, default=DEFAULT_FASTA)
    parser.add_argument("--n", type=int, default=100, help="proteins (the first N of the file)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="esm2_8M,unirep256",
                        help="comma-separated: esm2_8M (random weights), unirep256 (skipped without its weights)")
    parser.add_argument("--precision", default="auto", help="ESM-2's compute precision (UniRep runs fp32)")
    parser.add_argument("--threads", default="1,2,default", help="thread counts; 'default' leaves it to embedcache")
    parser.add_argument("--policies", default="auto,unset,passive,active",
                        help="OMP_WAIT_POLICY values to try; auto: what the command lines choose (PASSIVE when "
                             "other processes hold a core, else unset); one thread runs only under the first")
    parser.add_argument("--conditions", default="idle,busy")
    args = parser.parse_args()

    from embedcache.models import random_esm2, save_esm2_checkpoint
    from embedcache.sequences import read_sequences
    from embedcache.threads import available_cores, others_load

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        records = read_sequences(args.fasta)[: args.n]
        fasta = tmp / "proteins.fasta"
        fasta.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in records))
        models = []
        for name in args.models.split(","):
            if name == "esm2_8M":
                weights = save_esm2_checkpoint(random_esm2("esm2_t6_8M_UR50D", seed=0), tmp / "random_8M.pt")
                models.append({"name": name, "weights": str(weights), "model": None})
            elif name == "unirep256":
                if (UNIREP_DIR / "uniref50_256" / "model_weights.npz").exists():
                    models.append({"name": name, "model": "unirep256", "weights": None})
                else:
                    print(f"unirep256: no weights in {UNIREP_DIR}; left out")
            else:
                parser.error(f"unknown model {name!r}")
        threads = [None if t == "default" else int(t) for t in args.threads.split(",")]
        policies = args.policies.split(",")
        conditions = args.conditions.split(",")
        print(f"{len(records)} proteins from {args.fasta.name}; {available_cores()} cores; precision "
              f"{args.precision}; {args.repeats} interleaved repeats; each configuration in a fresh process")

        load = others_load(list(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0], 1.0)
        if load is not None and load > 0.2:
            print(f"warning: other processes use {load:.1f} cores now; 'idle' is not idle and the numbers are noisy")
        times: dict[tuple, list[float]] = {}
        choices: dict[tuple, str] = {}
        for repeat in range(args.repeats):
            for condition in conditions:
                spinner = None
                if condition == "busy":
                    spinner = multiprocessing.Process(target=spin, daemon=True)
                    spinner.start()
                    time.sleep(0.5)  # let the scheduler see it before the child decides
                try:
                    for model in models:
                        for policy in policies:
                            for t in threads:
                                if t == 1 and policy != policies[0]:
                                    continue  # one thread meets no barrier: the policy cannot matter
                                r = run_child(model, t, policy, args.precision, fasta, tmp)
                                key = (model["name"], condition, policy, t)
                                times.setdefault(key, []).append(r["residues"] / r["seconds"])
                                if t is None:
                                    choices[key] = r["choice"] or f"{r['threads']} threads"
                finally:
                    if spinner is not None:
                        spinner.terminate()
                        spinner.join()
            print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)

        print(f"\n{'model':10s} {'condition':9s} {'OMP_WAIT_POLICY':15s} {'threads':>8s} {'res/s':>9s}  default chose")
        for key in sorted(times, key=lambda k: (k[0], k[1], k[2], k[3] is None, k[3] or 0)):
            model, condition, policy, t = key
            label = "default" if t is None else str(t)
            print(f"{model:10s} {condition:9s} {policy:15s} {label:>8s} {statistics.median(times[key]):9.0f}  "
                  f"{choices.get(key, '')}")

        print("\ndefault (each policy) against the best fixed choice (any thread count and policy):")
        for model in dict.fromkeys(k[0] for k in times):
            for condition in conditions:
                fixed = {k: statistics.median(v) for k, v in times.items()
                         if k[0] == model and k[1] == condition and k[3] is not None}
                if not fixed:
                    continue
                best_key = max(fixed, key=fixed.__getitem__)
                for policy in policies:
                    default = times.get((model, condition, policy, None))
                    if default:
                        ratio = statistics.median(default) / fixed[best_key]
                        print(f"  {model:10s} {condition:5s} default, {policy:8s}: {ratio:5.2f}x of the best "
                              f"({best_key[3]} thread(s), {best_key[2]}: {fixed[best_key]:.0f} res/s)")


if __name__ == "__main__":
    sys.exit(main())
