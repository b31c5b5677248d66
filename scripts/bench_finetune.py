"""Fine-tuning throughput: HuggingFace Trainer at batch size 1 vs heads.finetune, same proteins.

    pip install -e ".[bench]"
    python scripts/bench_finetune.py --n 48 --repeats 3 --threads 2

Both train the same ESM-2 shape (random weights; speed does not depend on weight values)
for one epoch over the same proteins, full fine-tuning, AdamW, on CPU unless --device cuda:

  (a) seeds' recipe  transformers' EsmForSequenceClassification (dropout 0, as the released
                     ESM-2 configs) trained by ``Trainer`` with per_device_train_batch_size=1,
                     fp32, no padding (one protein per step).
  (b) heads.finetune FinetuneHead(mode="full"): length-sorted token-budget batches, SDPA
                     forward, fp32 and bf16 autocast.

Tokens are real tokens (residues + BOS/EOS, cropped at 1022 residues), padding not counted.
Repeats are interleaved so machine noise hits every method alike; medians are printed, and
the ratio of each of ours to (a). A warm-up epoch on a few proteins precedes each timing.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from embedcache.models import ESM2_MODELS, random_esm2, save_esm2_checkpoint
from embedcache.sequences import read_sequences
from heads.finetune import FinetuneHead

DEFAULT_FASTA = Path(__file__).resolve().parents[2] / "shared/data/deeplocpro/graphpart_subset.fasta"
CROP = 1022


def hf_model(shape: tuple[int, int, int], n_classes: int):
    from transformers import EsmConfig, EsmForSequenceClassification

    layers, dim, heads = shape
    config = EsmConfig(vocab_size=33, pad_token_id=1, mask_token_id=32, hidden_size=dim, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=4 * dim, max_position_embeddings=1026,
                       position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=n_classes)
    torch.manual_seed(0)
    return EsmForSequenceClassification(config)


def tokens_of(sequences: list[str]) -> list[list[int]]:
    from esm.data import Alphabet

    alphabet = Alphabet.from_architecture("ESM-1b")
    return [[alphabet.cls_idx] + [alphabet.get_idx(a) for a in s[:CROP]] + [alphabet.eos_idx] for s in sequences]


def run_hf(shape, sequences, labels, n_classes, device, out_dir) -> float:
    from transformers import Trainer, TrainingArguments

    class Proteins(torch.utils.data.Dataset):
        def __init__(self, ids, y):
            self.ids, self.y = ids, y

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            ids = torch.tensor(self.ids[i])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": int(self.y[i])}

    model = hf_model(shape, n_classes)
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=1, num_train_epochs=1, learning_rate=2e-5,
                             weight_decay=0.01, save_strategy="no", report_to=[], logging_steps=10_000,
                             use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True, seed=0)
    ids = tokens_of(sequences)
    warm = Trainer(model=model, args=args, train_dataset=Proteins(ids[:4], labels[:4]))
    warm.train()
    trainer = Trainer(model=model, args=args, train_dataset=Proteins(ids, labels))
    start = time.perf_counter()
    trainer.train()
    if device != "cpu":
        torch.cuda.synchronize()
    return sum(len(t) for t in ids) / (time.perf_counter() - start)


def run_ours(weights, sequences, labels, mode, precision, batch_tokens, device, threads) -> float:
    top = mode.startswith("top")

    def head():
        return FinetuneHead(weights=str(weights), mode="top" if top else mode,
                            top_layers=int(mode[3:] or 0) if top else 2,
                            max_epochs=1, lr=2e-5, precision=precision, batch_tokens=batch_tokens, device=device,
                            threads=threads, crop=CROP)

    head().fit(sequences[:4], labels[:4])
    fitted = head().fit(sequences, labels)
    return fitted.history_[0]["train_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fasta", type=Path, default=DEFAULT_FASTA)
    parser.add_argument("--n", type=int, default=48, help="proteins (every k-th of the file)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", default="esm2_t6_8M_UR50D", choices=list(ESM2_MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="full/fp32/4096,full/bf16/4096",
                        help="ours: MODE/PRECISION/BATCH_TOKENS,... with MODE full, lora or topK (K top layers)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    records = read_sequences(args.fasta)
    step = max(1, len(records) // args.n)
    chosen = records[::step][: args.n]
    sequences = [r.sequence for r in chosen]
    labels = np.arange(len(sequences)) % 6
    n_tokens = sum(min(len(s), CROP) + 2 for s in sequences)
    shape = ESM2_MODELS[args.shape]
    modes = [(m.split("/")[0], m.split("/")[1], int(m.split("/")[2])) for m in args.modes.split(",")]
    print(f"{args.shape} {shape}, random weights; {len(sequences)} proteins, {n_tokens} tokens; "
          f"device {args.device}, {args.threads} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_esm2_checkpoint(random_esm2(args.shape), Path(tmp) / f"{args.shape}_random.pt")
        results: dict[str, list[float]] = {"(a) HF Trainer, batch 1, fp32": []}
        for mode, precision, budget in modes:
            results[f"(b) ours {mode} {precision}, {budget} tokens/batch"] = []
        for repeat in range(args.repeats):
            results["(a) HF Trainer, batch 1, fp32"].append(
                run_hf(shape, sequences, labels, 6, args.device, str(Path(tmp) / "hf")))
            for mode, precision, budget in modes:
                results[f"(b) ours {mode} {precision}, {budget} tokens/batch"].append(
                    run_ours(weights, sequences, labels, mode, precision, budget, args.device, args.threads))
            print(f"repeat {repeat + 1}: " + ", ".join(f"{v[-1]:.0f}" for v in results.values()), file=sys.stderr)
    base = statistics.median(results["(a) HF Trainer, batch 1, fp32"])
    print(f"\n{'method':46s} {'tokens/s (median)':>18s} {'vs (a)':>8s}   runs")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:46s} {median:18.0f} {median / base:7.2f}x   {', '.join(f'{v:.0f}' for v in values)}")
    print("(a) and the 'full' rows train the same weights; lora and topK rows train less and are not the same job.")


if __name__ == "__main__":
    main()
