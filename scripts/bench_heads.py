"""Head training time at DeepLocPro's size, on synthetic embeddings.

    python scripts/bench_heads.py                    # 12,000 proteins, ~350 residues, 320 dims, fp16

A synthetic cache (written through embedcache's store, read through EmbeddingCache as real
runs do) holds 6 imbalanced classes whose residues carry a weak class-specific shift in a few
dimensions. Timed, on one set of 5 folds (simple scheme):
  - logistic regression, all 5 folds (C chosen on each validation fold)      target < 10 s
  - LightGBM, all 5 folds (early stopping on each validation fold)           target < 60 s
  - attention pooling, one fold, to early stopping or max_epochs             target < 2 min
and, for the attention head's data path, one epoch with length-bucketed batches against one
with batches in random order, with their padding efficiency (real residues / padded slots).
The accuracies printed are of synthetic data: they show that training worked, nothing more.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from embedcache.extract import available_cores, torch_threads
from embedcache.sequences import Record
from embedcache.store import EmbeddingCache, write_arrays
from heads.attention import AttentionHead, AttentionPooling
from heads.datasets import LabeledSet
from heads.estimators import LightGBMHead, LogisticHead
from heads.evaluate import cross_validate
from heads.features import FeatureSource, length_batches, pad
from heads.folds import SimpleCV, stratified_folds

CLASS_SHARE = np.array([0.28, 0.27, 0.21, 0.13, 0.08, 0.03])  # DeepLocPro-like imbalance


def synthetic(n: int, mean_length: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(CLASS_SHARE), size=n, p=CLASS_SHARE)
    lengths = np.clip(rng.gamma(4.0, mean_length / 4.0, size=n).astype(int), 30, 2000)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    records = [Record(f"p{i}", f"p{i}", "".join(rng.choice(letters, size=int(L)))) for i, L in enumerate(lengths)]
    shifts = rng.normal(0, 0.3, size=(len(CLASS_SHARE), dim)) * (rng.random((len(CLASS_SHARE), dim)) < 0.05)

    def arrays():
        for i, L in enumerate(lengths):
            rows = rng.standard_normal((int(L), dim), dtype=np.float32)
            signal = rng.random(int(L)) < 0.2  # a fifth of the residues carry the class signal
            rows[signal] += shifts[labels[i]]
            yield rows.astype(np.float16)

    return records, labels, lengths, arrays()


def epoch_seconds(module, X, y, batches, rng) -> float:
    optimiser = torch.optim.AdamW(module.parameters(), lr=1e-3)
    start = time.perf_counter()
    for b in rng.permutation(len(batches)):
        idx = batches[b]
        x, mask = pad(X.read(idx), 1022)
        loss = F.cross_entropy(module(torch.from_numpy(x), torch.from_numpy(mask)), torch.from_numpy(y[idx]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12000)
    parser.add_argument("--length", type=int, default=350)
    parser.add_argument("--dim", type=int, default=320)
    parser.add_argument("--cache", type=Path, help="reuse/keep the synthetic cache here")
    parser.add_argument("--max-epochs", type=int, default=60)
    args = parser.parse_args()
    threads = available_cores()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.cache or Path(tmp) / "synthetic.h5"
        records, labels, lengths, arrays = synthetic(args.n, args.length, args.dim)
        if not path.exists():
            start = time.perf_counter()
            write_arrays(path, records, arrays, model="synthetic")
            print(f"synthetic cache: {args.n} proteins, {lengths.sum()} residues (mean {lengths.mean():.0f}), "
                  f"{args.dim} dims fp16, {path.stat().st_size / 1e9:.2f} GB, "
                  f"written in {time.perf_counter() - start:.0f} s")
        data = LabeledSet("synthetic", [r.id for r in records], [r.sequence for r in records], labels,
                          [f"class{k}" for k in range(len(CLASS_SHARE))])
        data.folds = stratified_folds(labels, data.sequences, 5, 0)
        splits = SimpleCV().split(data.folds)
        print(f"{threads} threads; 5 folds of ~{len(splits[0].test)} proteins\n")

        with EmbeddingCache(path) as cache:
            features = FeatureSource(cache, data.sequences, ids=data.ids)
            start = time.perf_counter()
            features.pooled()
            print(f"read pooled matrix: {time.perf_counter() - start:.2f} s")
            for name, head, target in [("logistic regression", LogisticHead(), 10),
                                       ("LightGBM", LightGBMHead(), 60)]:
                start = time.perf_counter()
                result = cross_validate(head, data, features, splits, name, keep_models=False)
                seconds = time.perf_counter() - start
                acc = (result.proba.argmax(1) == labels).mean()
                chosen = [{k: v for k, v in s.items() if k in ("C", "best_iteration")} for s in result.splits]
                print(f"{name:20s} 5 folds {seconds:6.1f} s (target < {target} s)  "
                      f"synthetic accuracy {acc:.3f}  {chosen}")

            split = splits[0]
            head = AttentionHead(max_epochs=args.max_epochs)
            X = features.residues()
            start = time.perf_counter()
            head.fit(X[split.train], labels[split.train], eval_set=(X[split.val], labels[split.val]))
            seconds = time.perf_counter() - start
            acc = (head.predict(X[split.test]) == labels[split.test]).mean()
            per_epoch = np.median([h["seconds"] for h in head.history_])
            print(f"{'attention pooling':20s} 1 fold  {seconds:6.1f} s (target < 120 s)  {len(head.history_)} epochs "
                  f"(best {head.best_epoch_}), median {per_epoch:.1f} s/epoch incl. validation, "
                  f"synthetic accuracy {acc:.3f}")

            train = X[split.train]
            y = labels[split.train]
            rng = np.random.default_rng(0)
            bucketed = length_batches(train.lengths, 32768, 128)
            order = rng.permutation(len(train))
            size = len(order) // len(bucketed) + 1
            shuffled = [order[i : i + size] for i in range(0, len(order), size)]
            for name, batches in [("length-bucketed", bucketed), ("random order", shuffled)]:
                padded = sum(int(train.lengths[b].max()) * len(b) for b in batches)
                torch.manual_seed(0)
                module = AttentionPooling(args.dim, len(CLASS_SHARE))
                with torch_threads(threads):
                    t = epoch_seconds(module, train, y, batches, rng)
                print(f"  one training epoch, {name:16s} {len(batches):4d} batches: {t:5.1f} s, "
                      f"padding efficiency {train.lengths.sum() / padded:.2f}")


if __name__ == "__main__":
    main()
