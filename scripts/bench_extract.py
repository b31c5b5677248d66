"""Extraction throughput: fair-esm's extract.py path vs embedcache vs esm-cpp, same proteins, same threads.

    python scripts/bench_extract.py --threads 1 --shapes esm2_t6_8M_UR50D,esm2_t12_35M_UR50D
    python scripts/bench_extract.py --threads 2 --n 100 --shapes 8M,35M,150M,650M --proteins-per-shape 150M=24,650M=8

Models have random weights of the official shapes (speed does not depend on weight values).
Methods, each timed on the same proteins in the same process, repeats interleaved so that
machine noise hits all of them alike; medians are reported:

  (a) fair-esm   esm.FastaBatchedDataset, get_batch_indices(4096, extra_toks_per_seq=1), the
                 alphabet's batch converter truncating at 1022, ESM2.forward under no_grad,
                 per-token and mean representations cloned per protein (extract.py's loop
                 without its torch.save per protein).
  (b) embedcache the library's work plan and runner (embedcache.extract._Runner): SDPA
                 forward, residue slicing and mean pooling, at several budgets/precisions:
                 fp32, bf16, and int8 (int8 weights per output channel, int8 activations
                 per token, in every Linear layer; CPU only).
  (c) esm-cpp    the C++ engine (`pip install --no-deps esm-cpp`), loading the same weights
                 from a Hugging Face safetensors directory written from the same fair-esm model
                 (esm2_to_hf, plus the language-model head and per-layer rotary buffers that
                 esm-cpp's loader reads under EsmForMaskedLM's names). "packed" is its
                 documented fast path for variable-length batches, Model.forward_scheduled
                 (sequences packed without padding, length-bucketed), which returns only
                 logits; "states" is the only call that returns hidden states,
                 forward_with_hidden_states, one protein at a time. INT8 is its
                 quantize_weights() (per-channel INT8 weights, W8A8) on a second copy.

Outputs are checked before timing: last-layer per-residue states against embedcache fp32
(max abs diff on the first --check-n proteins), esm-cpp's packed logits against its
per-protein logits, and every timed mode's pooled vectors against embedcache fp32's (minimum
cosine over all proteins). Achieved GFLOP/s counts the useful work (no padding, no LM head):
per layer 24*n*E^2 + 4*n^2*E for a sequence of n tokens, against dense matmul peaks measured
here in fp32 and bf16. Targets of the issue are printed after each shape and at the end.
With --end-to-end FILE it also times `embedcache.extract` writing a real cache of FILE.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedcache.atomic import atomic_path, write_text
from embedcache.backbone import ESM2Backbone
from embedcache.batching import classify, plan_work
from embedcache.extract import ExtractConfig, _Runner, extract
from embedcache.models import ESM2_MODELS, random_esm2, save_esm2_checkpoint
from embedcache.sequences import read_sequences

DEFAULT_FASTA = Path(__file__).resolve().parents[2] / "shared/data/deeplocpro/graphpart_subset.fasta"
MAX_RESIDUES = 1022
METHODS = ("fair-esm", "embedcache", "esm-cpp")
# The targets: our fastest mode that keeps embeddings (pooled cosine to fp32) against
# esm-cpp's fastest mode, and fp32 against fp32.
TARGET_FASTEST, TARGET_FP32, TARGET_COSINE = 1.5, 1.0, 0.999
FAIR = "(a) fair-esm extract.py, fp32, 4096"


@dataclass
class Method:
    """One timed way of embedding the shape's proteins."""

    name: str
    family: str  # "fair-esm", "embedcache" or "esm-cpp"
    precision: str  # "fp32", "bf16" or "int8": which rows compare fp32 with fp32
    run: Callable[[], tuple[float, np.ndarray | None]]  # seconds, pooled vectors (None: none produced)
    note: str = ""


def short_name(shape: str) -> str:
    return shape.split("_")[2]


def resolve_shape(name: str) -> str:
    """Full ESM-2 name from itself or its size ("8M", "650M")."""
    for shape in ESM2_MODELS:
        if name in (shape, short_name(shape)):
            return shape
    raise SystemExit(f"unknown shape {name!r}; known: {', '.join(ESM2_MODELS)} (or their sizes, e.g. 8M)")


def parse_per_shape(text: str) -> dict[str, int]:
    out = {}
    for part in filter(None, text.split(",")):
        name, _, count = part.partition("=")
        if not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--proteins-per-shape: {part!r} is not SHAPE=N with N >= 1")
        out[resolve_shape(name.strip())] = int(count)
    return out


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


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run_fair_esm(model, alphabet, labels, seqs) -> tuple[float, np.ndarray]:
    from esm.data import FastaBatchedDataset

    dataset = FastaBatchedDataset(labels, seqs)
    batches = dataset.get_batch_indices(4096, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(
        dataset, collate_fn=alphabet.get_batch_converter(MAX_RESIDUES), batch_sampler=batches
    )
    layer = model.num_layers
    pooled = {}
    start = time.perf_counter()
    with torch.no_grad():
        for labels_, strs, toks in loader:
            out = model(toks, repr_layers=[layer], return_contacts=False)
            reps = {k: t.to("cpu") for k, t in out["representations"].items()}
            for i in range(len(labels_)):
                n = min(MAX_RESIDUES, len(strs[i]))
                _ = {k: t[i, 1 : n + 1].clone() for k, t in reps.items()}
                means = {k: t[i, 1 : n + 1].mean(0).clone() for k, t in reps.items()}
                pooled[labels_[i]] = means[layer]
    seconds = time.perf_counter() - start
    return seconds, torch.stack([pooled[label] for label in labels]).numpy()


def embedcache_outputs(backbone: ESM2Backbone, seqs, budget: int, keep_states: bool):
    """Seconds, pooled (N, D) and, if asked, last-layer per-residue states in input order."""
    layer = backbone.num_layers
    entries = [classify(str(i), s, MAX_RESIDUES, "truncate") for i, s in enumerate(seqs)]
    items = plan_work(entries, budget, backbone.extra_tokens, MAX_RESIDUES, 0)
    runner = _Runner(backbone, [layer], budget)
    pooled: dict[int, np.ndarray] = {}
    states: dict[int, np.ndarray] = {}
    start = time.perf_counter()
    for item in items:
        for done in runner.run(item):
            pooled[int(done.entry.key)] = done.pooled[layer]
            if keep_states:
                states[int(done.entry.key)] = done.per_residue[layer]
    seconds = time.perf_counter() - start
    return seconds, np.stack([pooled[i] for i in range(len(seqs))]), [states.get(i) for i in range(len(seqs))]


# ---- esm-cpp ---------------------------------------------------------------------------------


def import_esm_cpp(threads: int):
    """The esm_cpp module, or None when it is not installed."""
    # Its thread pool is sized from ESM_NUM_THREADS when the first model loads, once per process.
    os.environ["ESM_NUM_THREADS"] = str(threads)
    try:
        import esm_cpp
    except ImportError:
        return None
    return esm_cpp


def write_esm_cpp_weights(model, directory: Path) -> Path:
    """A Hugging Face directory (EsmForMaskedLM names, safetensors) holding ``model``'s exact weights.

    The encoder comes from esm2_to_hf, as for the Hugging Face backbone; esm-cpp's loader also
    requires the language-model head and each layer's rotary buffer, under EsmForMaskedLM's names.
    """
    from safetensors.torch import save_file

    from embedcache.backbones.hf_esm2 import ESM2_VOCAB, WEIGHTS_FILE, esm2_to_hf

    hf = esm2_to_hf(model)
    encoder = hf.state_dict()
    state = {f"esm.{k}": v for k, v in encoder.items()}
    for i in range(model.num_layers):
        rotary = f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"
        state[rotary] = encoder["rotary_embeddings.inv_freq"]
    head = model.lm_head
    state.update({
        "lm_head.dense.weight": head.dense.weight, "lm_head.dense.bias": head.dense.bias,
        "lm_head.layer_norm.weight": head.layer_norm.weight, "lm_head.layer_norm.bias": head.layer_norm.bias,
        "lm_head.decoder.weight": head.weight, "lm_head.bias": head.bias,
    })
    # safetensors refuses tensors that share memory: the rotary buffer is copied per layer, the
    # LM head's weight is fair-esm's embedding matrix (a copy of which esm2_to_hf made).
    shared = {id(encoder["rotary_embeddings.inv_freq"]), id(head.weight)}
    state = {k: (v.detach().clone() if id(v) in shared else v.detach()).contiguous() for k, v in state.items()}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config = hf.config
    config.architectures = ["EsmForMaskedLM"]
    write_text(directory / "config.json", config.to_json_string())
    write_text(directory / "vocab.txt", "\n".join(ESM2_VOCAB) + "\n")
    return directory / WEIGHTS_FILE


def esm_cpp_ids(esm_cpp, alphabet, seqs) -> list[np.ndarray]:
    """esm-cpp's tokens for the truncated sequences, refused if they differ from fair-esm's."""
    tokenizer = esm_cpp.Tokenizer()
    out = []
    for seq in seqs:
        seq = seq[:MAX_RESIDUES]
        ids = np.asarray(tokenizer.encode(seq), dtype=np.int32)
        ours = [alphabet.cls_idx, *(alphabet.get_idx(c) for c in seq), alphabet.eos_idx]
        if ids.tolist() != ours:
            raise SystemExit(f"esm-cpp tokenizes {seq[:30]}... differently from fair-esm; outputs would not compare")
        out.append(ids)
    return out


def esm_cpp_states(engine, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and last-layer per-residue states (final layer norm applied) of one protein."""
    logits, hidden = engine.forward_with_hidden_states(ids)
    return logits, hidden[-1][1:-1]


def run_esm_cpp_states(engine, ids_list) -> tuple[float, np.ndarray]:
    pooled = []
    start = time.perf_counter()
    for ids in ids_list:
        _, states = esm_cpp_states(engine, ids)
        pooled.append(states.mean(axis=0, dtype=np.float64).astype(np.float32))
    return time.perf_counter() - start, np.stack(pooled)


def run_esm_cpp_packed(engine, ids_list, tokens: int) -> tuple[float, None]:
    chunks = [ids_list] if tokens <= 0 else token_chunks(ids_list, tokens)
    start = time.perf_counter()
    for chunk in chunks:
        engine.forward_scheduled(chunk)
    return time.perf_counter() - start, None


def token_chunks(ids_list: list[np.ndarray], tokens: int) -> list[list[np.ndarray]]:
    """Length-sorted groups of at most ``tokens`` tokens (a longer protein alone)."""
    ordered = sorted(ids_list, key=len, reverse=True)
    chunks: list[list[np.ndarray]] = [[]]
    used = 0
    for ids in ordered:
        if chunks[-1] and used + len(ids) > tokens:
            chunks.append([])
            used = 0
        chunks[-1].append(ids)
        used += len(ids)
    return chunks


# ---- one shape -----------------------------------------------------------------------------


def bench_shape(shape: str, labels, seqs, args, esm_cpp, tmp: Path, peaks: dict[str, float]) -> dict:
    model = random_esm2(shape, seed=0)
    backbone = ESM2Backbone(model, model.alphabet, shape, shape)
    layers, dim = ESM2_MODELS[shape][:2]
    work = useful_gflop([len(s) for s in seqs], layers, dim)
    residues = sum(min(len(s), MAX_RESIDUES) for s in seqs)
    check = list(range(min(args.check_n, len(seqs))))
    check_seqs = [seqs[i] for i in check]
    methods: list[Method] = []

    if "fair-esm" in args.methods:
        methods.append(Method(FAIR, "fair-esm", "fp32", lambda: run_fair_esm(model, model.alphabet, labels, seqs)))

    def ours(bb: ESM2Backbone, precision: str, budget: int):
        def run():
            bb.set_precision(precision)
            seconds, pooled, _ = embedcache_outputs(bb, seqs, budget, keep_states=False)
            return seconds, pooled
        return run

    for precision, budget in args.mode_pairs:
        methods.append(Method(f"(b) embedcache {precision}, {budget}", "embedcache", precision,
                              ours(backbone, precision, budget)))
    # Per-residue states of embedcache fp32: the reference every other output is compared with.
    backbone.set_precision("fp32")
    _, _, reference = embedcache_outputs(backbone, check_seqs, args.mode_pairs[0][1], keep_states=True)
    diffs: dict[str, str] = {}
    for precision, budget in args.mode_pairs:
        if precision != "fp32":
            backbone.set_precision(precision)
            _, _, got = embedcache_outputs(backbone, check_seqs, budget, keep_states=True)
            diffs[f"(b) embedcache {precision}, {budget}"] = _max_diff(got, reference)

    if "esm-cpp" in args.methods and esm_cpp is not None:
        weights = write_esm_cpp_weights(model, tmp / f"hf_{short_name(shape)}")
        ids_list = esm_cpp_ids(esm_cpp, model.alphabet, seqs)
        engines = {}
        for precision in sorted({p for p, _ in args.esm_cpp_pairs}):
            engine = esm_cpp.Model.load_from_safetensors(str(weights))
            if precision == "int8":
                engine.quantize_weights()
            engines[precision] = engine
        if engines and esm_cpp.Model.num_threads != args.threads:
            print(f"  WARNING: esm-cpp runs {esm_cpp.Model.num_threads} threads, not {args.threads} "
                  f"(its pool was sized earlier in this process)")
        for precision, engine in engines.items():
            states, packed_gap, logit_scale = [], 0.0, 0.0
            packed = engine.forward_scheduled([ids_list[i] for i in check])
            for i in check:
                logits, s = esm_cpp_states(engine, ids_list[i])
                states.append(s)
                packed_gap = max(packed_gap, float(np.abs(packed[i] - logits).max()))
                logit_scale = max(logit_scale, float(np.abs(logits).max()))
            diffs[f"(c) esm-cpp {precision}"] = (f"{_max_diff(states, reference)}; packed vs per-protein logits "
                                                 f"max abs diff {packed_gap:.1e} (largest |logit| {logit_scale:.1f})")
        for precision, path in args.esm_cpp_pairs:
            engine = engines[precision]
            if path == "packed":
                run = (lambda e: lambda: run_esm_cpp_packed(e, ids_list, args.esm_cpp_tokens))(engine)
                note = "logits only"
            else:
                run = (lambda e: lambda: run_esm_cpp_states(e, ids_list))(engine)
                note = "embeddings"
            methods.append(Method(f"(c) esm-cpp {precision}, {path}", "esm-cpp", precision, run, note=note))

    times: dict[str, list[float]] = {m.name: [] for m in methods}
    pooled: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for m in methods:
            seconds, vectors = m.run()
            times[m.name].append(seconds)
            if vectors is not None:
                pooled[m.name] = vectors
    ref_name = next(m.name for m in methods if m.family == "embedcache" and m.precision == "fp32")
    cos = {name: float(cosines(v, pooled[ref_name]).min()) for name, v in pooled.items()}
    # Packed esm-cpp yields no embeddings; its numbers are those of the same engine's per-protein path.
    borrowed = set()
    for m in methods:
        if m.name not in cos and m.family == "esm-cpp":
            twin = [n for n in cos if n.startswith(f"(c) esm-cpp {m.precision},")]
            if twin:
                cos[m.name] = cos[twin[0]]
                borrowed.add(m.name)
    if "esm-cpp" in args.methods and esm_cpp is not None and "int8" in {p for p, _ in args.esm_cpp_pairs}:
        f32 = [n for n in pooled if n.startswith("(c) esm-cpp fp32,")]
        i8 = [n for n in pooled if n.startswith("(c) esm-cpp int8,")]
        if f32 and i8:
            to_fp32 = cosines(pooled[i8[0]], pooled[f32[0]]).min()
            diffs["(c) esm-cpp int8"] += f"; pooled cosine to esm-cpp fp32 min {to_fp32:.5f}"

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians.get(FAIR)
    print(f"{shape} (random weights), {len(seqs)} proteins, {residues} residues, {work:.0f} useful GFLOP; "
          f"median of {args.repeats}")
    print(f"  {'method, precision, token budget / path':40s} {'seconds':>8s} {'res/s':>8s} {'vs (a)':>7s} "
          f"{'GFLOP/s':>8s} {'of fp32':>8s} {'of bf16':>8s} {'cos min':>8s}")
    for m in methods:
        t = medians[m.name]
        vs = f"{base / t:6.2f}x" if base else "      -"
        c = f"{cos[m.name]:8.5f}" if m.name in cos else "       -"
        c = f"{c[1:]}*" if m.name in borrowed else c
        note = f"  ({m.note})" if m.note else ""
        print(f"  {m.name:40s} {t:8.2f} {residues / t:8.0f} {vs} {work / t:8.1f} {work / t / peaks['fp32']:8.0%} "
              f"{work / t / peaks['bf16']:8.0%} {c}{note}")
    print(f"  cos min: lowest pooled cosine similarity to {ref_name} over the {len(seqs)} proteins"
          + ("; *: that of the same weights' states path (packed returns logits only)" if borrowed else ""))
    if diffs:
        print(f"  last-layer per-residue states vs {ref_name}, first {len(check)} proteins:")
    for name, text in diffs.items():
        print(f"    {name}: {text}")
    if "esm-cpp" in args.methods and esm_cpp is None:
        print("  (c) esm-cpp: skipped, the package is not installed (pip install --no-deps esm-cpp)")
    result = targets(shape, methods, medians, cos, residues)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  peak memory of this process so far: {peak_gb:.1f} GB\n")
    return result


def _max_diff(got: list[np.ndarray], reference: list[np.ndarray]) -> str:
    worst = max(float(np.abs(g - r).max()) for g, r in zip(got, reference))
    scale = max(float(np.abs(r).max()) for r in reference)
    return f"max abs diff {worst:.2e} (largest |value| {scale:.1f})"


def targets(shape: str, methods: list[Method], medians: dict[str, float], cos: dict[str, float], residues: int):
    """The issue's two targets for one shape, printed; None where a side was not measured."""
    speed = {m.name: residues / medians[m.name] for m in methods}

    def fastest(family: str, keep=lambda m: True):
        pool = [m for m in methods if m.family == family and keep(m)]
        return max(pool, key=lambda m: speed[m.name]) if pool else None

    ours_best = fastest("embedcache", lambda m: cos.get(m.name, 0.0) >= TARGET_COSINE)
    ours_fp32 = fastest("embedcache", lambda m: m.precision == "fp32")
    cpp_best = fastest("esm-cpp")
    cpp_fp32 = fastest("esm-cpp", lambda m: m.precision == "fp32")
    out = {"shape": shape}
    print(f"  targets at {short_name(shape)}:")
    for label, ours, theirs, goal in [
        (f"our fastest mode with pooled cosine >= {TARGET_COSINE} vs esm-cpp's fastest", ours_best, cpp_best,
         TARGET_FASTEST),
        ("our fastest fp32 vs esm-cpp's fastest fp32", ours_fp32, cpp_fp32, TARGET_FP32),
    ]:
        if ours is None or theirs is None:
            print(f"    {label}: not measured")
            continue
        ratio = speed[ours.name] / speed[theirs.name]
        met = "met" if ratio >= goal else "NOT met"
        print(f"    {label}: {ours.name} {speed[ours.name]:.0f} res/s / {theirs.name} {speed[theirs.name]:.0f} "
              f"res/s = {ratio:.2f}x (target >= {goal}x): {met}")
        out[label] = ratio >= goal
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fasta", type=Path, default=DEFAULT_FASTA)
    parser.add_argument("--n", type=int, default=200, help="proteins (the first N of the file)")
    parser.add_argument("--proteins-per-shape", default="",
                        help="fewer proteins for some shapes, e.g. 150M=24,650M=8 (the first N of the --n)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="esm2_t6_8M_UR50D,esm2_t12_35M_UR50D",
                        help="ESM-2 shapes by name or size: 8M,35M,150M,650M")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="which of fair-esm,embedcache,esm-cpp to time (embedcache always: the reference)")
    parser.add_argument("--modes", default="fp32:4096,fp32:1024,bf16:1024,bf16:2048,int8:1024",
                        help="embedcache precision:budget pairs to time (fp32, bf16, int8); the first fp32 one is "
                             "the reference")
    parser.add_argument("--esm-cpp-modes", default="fp32:packed,int8:packed,fp32:states,int8:states",
                        help="esm-cpp weights:path pairs; weights fp32|int8, path packed (forward_scheduled, "
                             "logits only) | states (forward_with_hidden_states per protein, embeddings)")
    parser.add_argument("--esm-cpp-tokens", type=int, default=0,
                        help="tokens per forward_scheduled call, length-sorted (0: all proteins in one call)")
    parser.add_argument("--prototypes", default="",
                        help="int8-dynamic: int8 at every fp32 budget (int8 is a library mode now: --modes int8:N)")
    parser.add_argument("--check-n", type=int, default=20, help="proteins whose per-residue states are compared")
    parser.add_argument("--end-to-end", type=Path, help="also time a full `extract` of this FASTA (8M shape)")
    args = parser.parse_args()

    args.methods = set(filter(None, args.methods.split(","))) | {"embedcache"}
    if args.methods - set(METHODS):
        raise SystemExit(f"--methods: unknown {sorted(args.methods - set(METHODS))}; known: {', '.join(METHODS)}")
    args.mode_pairs = []
    for mode in filter(None, args.modes.split(",")):
        precision, _, budget = mode.partition(":")
        if precision not in ("fp32", "bf16", "int8") or not budget.isdigit() or int(budget) < 1:
            raise SystemExit(f"--modes: {mode!r} is not fp32|bf16|int8:TOKENS (e.g. bf16:1024)")
        args.mode_pairs.append((precision, int(budget)))
    if not any(p == "fp32" for p, _ in args.mode_pairs):
        raise SystemExit("--modes needs an fp32 mode: it is the reference for every comparison")
    args.mode_pairs.sort(key=lambda pair: pair[0] != "fp32")
    args.esm_cpp_pairs = [tuple(m.split(":")) for m in args.esm_cpp_modes.split(",") if m]
    for pair in args.esm_cpp_pairs:
        if len(pair) != 2 or pair[0] not in ("fp32", "int8") or pair[1] not in ("packed", "states"):
            raise SystemExit(f"--esm-cpp-modes: {':'.join(pair)!r} is not fp32|int8:packed|states")
    args.prototypes = set(filter(None, args.prototypes.split(",")))
    if args.prototypes - {"int8-dynamic"}:
        raise SystemExit(f"--prototypes: unknown {sorted(args.prototypes - {'int8-dynamic'})}; known: int8-dynamic")
    if "int8-dynamic" in args.prototypes:
        # The library's --precision int8 replaced the prototype: the same budgets as fp32, in int8.
        for budget in sorted({b for p, b in args.mode_pairs if p == "fp32"} - {b for p, b in args.mode_pairs
                                                                               if p == "int8"}):
            args.mode_pairs.append(("int8", budget))
    shapes = [resolve_shape(s.strip()) for s in args.shapes.split(",") if s.strip()]
    per_shape = parse_per_shape(args.proteins_per_shape)

    torch.set_num_threads(args.threads)
    esm_cpp = import_esm_cpp(args.threads) if "esm-cpp" in args.methods else None
    records = read_sequences(args.fasta)[: args.n]
    if not records:
        raise SystemExit(f"{args.fasta}: no proteins to time (--n {args.n})")
    labels = [r.id for r in records]
    seqs = [r.sequence for r in records]
    residues = sum(min(len(s), MAX_RESIDUES) for s in seqs)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"{len(seqs)} proteins from {args.fasta.name}, {residues} residues (truncated at {MAX_RESIDUES}); "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    if esm_cpp is not None:
        print(f"esm-cpp {esm_cpp.__version__}, kernels {esm_cpp.current_isa()} (host {esm_cpp.host_isa()}), "
              f"numpy {np.__version__}")
    elif "esm-cpp" in args.methods:
        print("esm-cpp: not installed, its rows are skipped (pip install --no-deps esm-cpp)")
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s\n")

    results = []
    for shape in shapes:
        n = per_shape.get(shape, len(seqs))
        # One directory per shape: esm-cpp's weights file (2.6 GB at 650M) goes when the shape is done.
        with tempfile.TemporaryDirectory() as tmp:
            results.append(bench_shape(shape, labels[:n], seqs[:n], args, esm_cpp, Path(tmp), peaks))
    if esm_cpp is not None and len(results) > 1:
        print("issue #11 targets over all shapes:")
        for label in (f"our fastest mode with pooled cosine >= {TARGET_COSINE} vs esm-cpp's fastest",
                      "our fastest fp32 vs esm-cpp's fastest fp32"):
            marks = [(short_name(r["shape"]), r.get(label)) for r in results]
            verdict = "met" if all(m is True for _, m in marks) else "NOT met"
            print(f"  {label}: {verdict} ({', '.join(f'{s} {m}' for s, m in marks)})")
        print()

    if args.end_to_end:
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_esm2_checkpoint(random_esm2("esm2_t6_8M_UR50D"), Path(tmp) / "random_8M.pt")
            for precision, budget in [("fp32", 1024), ("bf16", 1024), ("int8", 1024)]:
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
