"""Fine-tuning: it learns, LoRA and top-k touch only what they should, resume, export, comparison."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from embedcache.backbone import ESM2Backbone
from embedcache.extract import ExtractConfig, extract
from embedcache.models import build_tiny_esm2, load_esm2
from embedcache.store import EmbeddingCache
from heads import training
from heads.estimators import Head
from heads.finetune import FinetuneHead, crop_sequence
from heads.run import RunConfig, predict, run_comparison

AMINO = np.array(list("ACDEFGHIKLMNPQRSTVY"))  # no W: the motif is made of it
MOTIF = "WWCWW"


def motif_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random proteins of 30-80 residues; class 1 carries MOTIF at a random place."""
    rng = np.random.default_rng(seed)
    sequences, labels = [], []
    for i in range(n):
        length = int(rng.integers(30, 80))
        seq = "".join(rng.choice(AMINO, length))
        if i % 2:
            at = int(rng.integers(0, length - len(MOTIF)))
            seq = seq[:at] + MOTIF + seq[at + len(MOTIF):]
        sequences.append(seq)
        labels.append(i % 2)
    return np.array(sequences, dtype=object), np.array(labels)


@pytest.fixture(scope="module")
def task():
    return motif_task(120, 0), motif_task(40, 1)


def quick(weights, **params) -> FinetuneHead:
    settings = {"weights": str(weights), "max_epochs": 4, "lr": 3e-3, "head_lr": 3e-3, "batch_tokens": 1024,
                "patience": 10, "threads": 1}
    return FinetuneHead(**{**settings, **params})


def test_crop_policies():
    seq = "ABCDEFGHIJ"
    assert crop_sequence(seq, 4, "n_terminal") == "ABCD"
    assert crop_sequence(seq, 5, "ends") == "ABCIJ"
    assert crop_sequence(seq, None, "ends") == seq and crop_sequence(seq, 20, "n_terminal") == seq
    window = crop_sequence(seq, 4, "random", np.random.default_rng(0))
    assert len(window) == 4 and window in seq
    assert crop_sequence(seq, 4, "random") == "ABCD"  # no generator: prediction uses the start


def test_full_finetuning_learns_a_motif(tiny_weights, task):
    (X, y), (Xv, yv) = task
    head = quick(tiny_weights, mode="full").fit(X, y, eval_set=(Xv, yv))
    losses = [r["train_loss"] for r in head.history_]
    assert losses[-1] < 0.5 * losses[0]
    assert max(r["val_accuracy"] for r in head.history_) >= 0.85  # chance is 0.5
    assert (head.predict(Xv) == yv).mean() >= 0.85  # the best epoch was restored
    assert head.predict_proba(Xv).shape == (40, 2)


def trained_and_base(head: FinetuneHead, weights):
    # The contact head is not in the checkpoint (fair-esm draws it afresh at every load) nor in use.
    base = {k: v for k, v in load_esm2(weights=weights).model.state_dict().items() if not k.startswith("contact_head")}
    trained = {k.replace("base_layer.", ""): v for k, v in head.classifier_.encoder.state_dict().items()
               if "lora_" not in k and not k.startswith("contact_head")}
    return trained, base


def test_lora_trains_adapters_and_head_only(tiny_weights, task):
    (X, y), (Xv, yv) = task
    head = quick(tiny_weights, mode="lora", lora_rank=4).fit(X, y, eval_set=(Xv, yv))
    trainable = {n for n, p in head.classifier_.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any("lora_B" in n for n in trainable)
    trained, base = trained_and_base(head, tiny_weights)
    assert set(trained) == set(base)
    assert all(torch.equal(trained[k], base[k]) for k in base)  # base weights untouched
    lora_b = [p for n, p in head.classifier_.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # adapters moved away from their zero start
    assert max(r["val_accuracy"] for r in head.history_) > 0.7


def test_top_layers_mode_changes_only_the_top(tiny_weights, task):
    (X, y), (Xv, yv) = task
    head = quick(tiny_weights, mode="top", top_layers=1, max_epochs=1).fit(X, y, eval_set=(Xv, yv))
    trained, base = trained_and_base(head, tiny_weights)
    changed = {k for k in base if not torch.equal(trained[k], base[k])}
    assert changed and all(k.startswith(("layers.2.", "emb_layer_norm_after")) for k in changed)


def test_saved_backbone_gives_the_same_embeddings(tiny_weights, task, tmp_path):
    (X, y), (Xv, yv) = task
    head = quick(tiny_weights, mode="lora", lora_rank=4, max_epochs=1, pooling="attention").fit(X, y, eval_set=(Xv, yv))
    exported = head.save_backbone(tmp_path / "finetuned.pt")
    proteins = [str(s) for s in Xv[:6]]
    with torch.no_grad():
        states, mask = head.classifier_.backbone.residue_states(proteins)
    fasta = tmp_path / "p.fasta"
    fasta.write_text("".join(f">p{i}\n{s}\n" for i, s in enumerate(proteins)))
    extract(fasta, tmp_path / "ft.h5", ExtractConfig(weights=str(exported), dtype="float32", threads=1))
    with EmbeddingCache(tmp_path / "ft.h5") as cache:
        for i, seq in enumerate(proteins):
            np.testing.assert_allclose(cache.per_residue(f"p{i}"), states[i, : len(seq)].numpy(), atol=1e-5)
    base = ESM2Backbone.load(weights=tiny_weights)
    assert not torch.allclose(base.residue_states(proteins[:1])[0], states[:1, : len(proteins[0])], atol=1e-4)
    # The head itself saves and loads back with the same predictions.
    again = Head.load(head.save(tmp_path / "m.finetune.pt"))
    np.testing.assert_allclose(again.predict_proba(Xv), head.predict_proba(Xv), atol=1e-5)


def test_resume_after_interruption_continues_from_the_saved_epoch(tiny_weights, task, tmp_path, monkeypatch, caplog):
    (X, y), (Xv, yv) = task
    whole = quick(tiny_weights, mode="full", max_epochs=3, checkpoint_dir=str(tmp_path / "whole")).fit(
        X, y, eval_set=(Xv, yv))

    saves = []
    real_save = training.save_checkpoint

    def crash_after_two(folder, state):
        real_save(folder, state)
        saves.append(state["epoch"])
        if len(saves) == 2:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(training, "save_checkpoint", crash_after_two)
    folder = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        quick(tiny_weights, mode="full", max_epochs=3, checkpoint_dir=str(folder)).fit(X, y, eval_set=(Xv, yv))
    saves.clear()
    caplog.set_level("INFO", logger="heads.training")
    resumed = quick(tiny_weights, mode="full", max_epochs=3, checkpoint_dir=str(folder)).fit(X, y, eval_set=(Xv, yv))
    assert saves == [3]  # only the epoch that was missing ran
    assert "2 epoch(s) done" in caplog.text
    assert [r["epoch"] for r in resumed.history_] == [1, 2, 3]
    assert pd.read_csv(folder / "epochs.csv")["epoch"].tolist() == [1, 2, 3]
    steps = pd.read_csv(folder / "steps.csv")
    assert steps["step"].tolist() == list(range(1, len(steps) + 1))
    assert (folder / "curves.png").stat().st_size > 0
    for a, b in zip(whole.history_, resumed.history_):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    np.testing.assert_allclose(resumed.predict_proba(Xv), whole.predict_proba(Xv), atol=1e-5)
    # A finished run is not trained again.
    saves.clear()
    quick(tiny_weights, mode="full", max_epochs=3, checkpoint_dir=str(folder)).fit(X, y, eval_set=(Xv, yv))
    assert saves == []


def test_a_checkpoint_never_resumes_on_other_weights_under_the_same_name(tiny_weights, task, tmp_path, caplog):
    """Replacing the base weights file (same name, same size) between runs must not resume the
    old training on the new base: the checkpoint is tied to the weights' sha256."""
    (X, y), (Xv, yv) = task
    weights = tmp_path / "w.pt"
    build_tiny_esm2(weights, num_layers=3, embed_dim=32, attention_heads=4, seed=0)
    quick(weights, mode="full", max_epochs=1, checkpoint_dir=str(tmp_path / "ck")).fit(X, y, eval_set=(Xv, yv))
    size = weights.stat().st_size
    build_tiny_esm2(weights, num_layers=3, embed_dim=32, attention_heads=4, seed=1)
    assert weights.stat().st_size == size
    caplog.set_level("INFO", logger="heads.training")
    again = quick(weights, mode="full", max_epochs=1, checkpoint_dir=str(tmp_path / "ck")).fit(
        X, y, eval_set=(Xv, yv))
    assert "written for other settings or data" in caplog.text
    fresh = quick(weights, mode="full", max_epochs=1).fit(X, y, eval_set=(Xv, yv))
    np.testing.assert_allclose(again.predict_proba(Xv), fresh.predict_proba(Xv), atol=1e-5)


def test_a_run_on_other_weights_under_the_same_name_is_another_run(tmp_path):
    """The run fingerprint covers the fine-tuned weights' contents, not only their path."""
    from heads.rundir import RunDirectoryError

    X, y = motif_task(60, 7)
    data = write_task_csv(tmp_path / "m.csv", X, y)
    weights = tmp_path / "w.pt"
    build_tiny_esm2(weights, num_layers=2, embed_dim=16, attention_heads=2, seed=0)
    config = RunConfig(data=str(data), heads=("finetune",), weights=str(weights), k=3, n_boot=100, figures=False,
                       head_params={"finetune": {"max_epochs": 1, "threads": 1, "batch_tokens": 1024}})
    run_comparison(config, tmp_path / "run")
    build_tiny_esm2(weights, num_layers=2, embed_dim=16, attention_heads=2, seed=1)
    with pytest.raises(RunDirectoryError, match="another run"):
        run_comparison(config, tmp_path / "run")


def write_task_csv(path, sequences, labels):
    pd.DataFrame({"id": [f"p{i}" for i in range(len(labels))], "sequence": sequences, "label": labels}).to_csv(
        path, index=False)
    return path


def test_compare_frozen_and_finetuned_heads_with_an_lr_sweep(tiny_weights, tmp_path):
    X, y = motif_task(100, 2)
    data = write_task_csv(tmp_path / "motif.csv", X, y)
    cache = tmp_path / "motif.h5"
    extract(data, cache, ExtractConfig(weights=str(tiny_weights), threads=1))
    config = RunConfig(data=str(data), cache=str(cache), heads=("logreg", "finetune"), k=3, lrs=(1e-3, 3e-3),
                       class_names={"0": "plain", "1": "motif"}, n_boot=200,
                       head_params={"finetune": {"max_epochs": 2, "head_lr": 3e-3, "threads": 1, "batch_tokens": 1024}})
    out = tmp_path / "run"
    summary = run_comparison(config, out)
    table = summary["table"]
    assert table["method"].tolist() == ["logreg", "finetune_lr0.001", "finetune_lr0.003"]
    assert (table["n"] == 100).all()
    assert any("finetune" in name and "logreg" in name for name in summary["tests"])
    run_config = json.loads((out / "config.json").read_text())
    assert run_config["methods"]["finetune_lr0.001"]["weights"] == str(tiny_weights)  # the cache's backbone
    assert (out / "plots" / "comparison.png").exists()
    assert (out / "plots" / "training_finetune_lr0.003.png").exists()
    models = sorted((out / "models" / "finetune_lr0.003").glob("*.finetune.pt"))
    assert len(models) == 3
    for split in ("test0_val1", "test1_val2", "test2_val0"):
        assert (out / "work" / "finetune_lr0.003" / split / "epochs.csv").exists()
    frame = predict(out, cache, head="finetune_lr0.003")
    assert len(frame) == 100 and frame.attrs["models"] == 3
    # Predictions of the saved ensemble on the cache's sequences equal the run's own test predictions
    # only on average; here we check they are valid probabilities.
    proba = frame[["p_motif", "p_plain"]].to_numpy()
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)


def test_finetune_without_a_cache_and_clear_errors(tiny_weights, tmp_path):
    X, y = motif_task(60, 3)
    data = write_task_csv(tmp_path / "m.csv", X, y)
    params = {"finetune": {"max_epochs": 1, "threads": 1}}
    summary = run_comparison(RunConfig(data=str(data), heads=("finetune",), k=3, weights=str(tiny_weights),
                                       head_params=params, n_boot=100), tmp_path / "a")
    assert summary["table"]["method"].tolist() == ["finetune"]
    with pytest.raises(ValueError, match="give --cache"):
        run_comparison(RunConfig(data=str(data), heads=("logreg", "finetune"), k=3, weights=str(tiny_weights),
                                 head_params=params), tmp_path / "b")
    with pytest.raises(ValueError, match="--model NAME or --weights PATH"):
        run_comparison(RunConfig(data=str(data), heads=("finetune",), k=3, head_params=params), tmp_path / "c")
    with pytest.raises(ValueError, match="mode must be one of"):
        FinetuneHead(weights=str(tiny_weights), mode="partial").fit(X, y)


def test_kill_and_rerun_resumes_the_comparison(tiny_weights, tmp_path):
    """kill -9 of a real `heads cv --head finetune` run; the same command resumes it."""
    X, y = motif_task(90, 4)
    data = write_task_csv(tmp_path / "m.csv", X, y)
    out = tmp_path / "run"
    command = [sys.executable, "-c", "from heads.cli import main; main()", "cv", "--head", "finetune",
               "--data", str(data), "--k", "3", "--weights", str(tiny_weights), "--out", str(out),
               "--set", "finetune.max_epochs=3", "--set", "finetune.threads=1", "--bootstrap", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = out / "work" / "finetune" / "test0_val1" / "last.pt"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stdout.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = torch.load(first, weights_only=True)["epoch"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"{done} epoch(s) done" in finished.stderr
    for split in ("test0_val1", "test1_val2", "test2_val0"):
        epochs = pd.read_csv(out / "work" / "finetune" / split / "epochs.csv")["epoch"].tolist()
        assert epochs == list(range(1, len(epochs) + 1))
    assert (out / "comparison.md").exists()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_weights):
    backbone = ESM2Backbone.load(weights=tiny_weights)
    backbone.model.train()
    proteins = ["MKTAYIAKQRQISFVKSHFSRQ", "MVLSPADKTNVKAAW", "W"]
    grads = []
    for checkpoint in (False, True):
        backbone.model.zero_grad()
        states, mask = backbone.residue_states(proteins, checkpoint=checkpoint)
        (states[mask] ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5)


def test_export_backbone_command(tiny_weights, task, tmp_path):
    from click.testing import CliRunner

    from heads.cli import main

    (X, y), (Xv, yv) = task
    head = quick(tiny_weights, mode="lora", lora_rank=4, max_epochs=1).fit(X, y, eval_set=(Xv, yv))
    saved = head.save(tmp_path / "m.finetune.pt")
    result = CliRunner().invoke(main, ["export-backbone", "--model", str(saved), "--out", str(tmp_path / "ft.pt")])
    assert result.exit_code == 0, result.output
    exported = ESM2Backbone.load(weights=tmp_path / "ft.pt")
    with torch.no_grad():
        expected = head.classifier_.backbone.residue_states(["MKTAYIAKQR"])[0]
        torch.testing.assert_close(exported.residue_states(["MKTAYIAKQR"])[0], expected, atol=1e-5, rtol=0)
    other = tmp_path / "other.pt"
    build_tiny_esm2(other, num_layers=3, embed_dim=32, attention_heads=4, seed=1)
    result = CliRunner().invoke(main, ["export-backbone", "--model", str(saved), "--out", str(tmp_path / "x.pt"),
                                       "--weights", str(other)])
    assert result.exit_code == 1 and "was trained from weights with sha256" in result.output


def test_finetuning_leaves_the_callers_random_state_alone_and_repeats_exactly(tiny_weights, task):
    (X, y), (Xv, yv) = task
    torch.manual_seed(11)
    np.random.seed(11)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    first = quick(tiny_weights, mode="full", max_epochs=1, dropout=0.3).fit(X[:40], y[:40], eval_set=(Xv, yv))
    first.predict_proba(Xv)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    torch.rand(3)
    second = quick(tiny_weights, mode="full", max_epochs=1, dropout=0.3).fit(X[:40], y[:40], eval_set=(Xv, yv))
    np.testing.assert_array_equal(first.predict_proba(Xv), second.predict_proba(Xv))


def test_finetune_parameters_are_checked_before_the_backbone_loads(tiny_weights):
    from heads.registry import make_head

    with pytest.raises(ValueError, match="finetune parameter warmup must be a number in \\[0, 1\\)"):
        make_head("finetune", {"weights": str(tiny_weights), "warmup": 2})
    with pytest.raises(ValueError, match="finetune has no parameter 'learning_rate'"):
        make_head("finetune", {"weights": str(tiny_weights), "learning_rate": 1e-3})


def test_lora_fits_do_not_depend_on_the_callers_random_state(tiny_weights, task):
    (X, y), (Xv, yv) = task
    fits = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        head = quick(tiny_weights, mode="lora", lora_rank=4, max_epochs=1).fit(X[:40], y[:40], eval_set=(Xv, yv))
        fits.append(head.predict_proba(Xv))
    np.testing.assert_array_equal(fits[0], fits[1])


def two_motif_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Label 0: MOTIF somewhere; label 1: CWWWC somewhere; each on for half the proteins, independently."""
    rng = np.random.default_rng(seed)
    sequences, labels = [], []
    for _ in range(n):
        on = rng.random(2) < 0.5
        if not on.any():
            on[rng.integers(2)] = True
        seq = "".join(rng.choice(AMINO, int(rng.integers(40, 80))))
        for flag, motif in zip(on, (MOTIF, "CWWWC")):
            if flag:
                at = int(rng.integers(0, len(seq) - len(motif)))
                seq = seq[:at] + motif + seq[at + len(motif):]
        sequences.append(seq)
        labels.append(on.astype(int))
    return np.array(sequences, dtype=object), np.array(labels)


def test_multilabel_finetuning_learns_each_label_and_keeps_its_thresholds(tiny_weights, tmp_path):
    from sklearn.metrics import roc_auc_score

    (X, Y), (Xv, Yv) = two_motif_task(120, 0), two_motif_task(40, 1)
    head = quick(tiny_weights, mode="full", max_epochs=10, lr=1e-2, head_lr=1e-2).fit(X, Y, eval_set=(Xv, Yv))
    proba = head.predict_proba(Xv)
    assert proba.shape == (40, 2) and head.multilabel_
    assert not np.allclose(proba.sum(1), 1.0)  # a sigmoid per label, not a softmax over them
    assert min(roc_auc_score(Yv[:, j], proba[:, j]) for j in range(2)) >= 0.8
    head.fit_thresholds(Xv, Yv)
    again = FinetuneHead.load(head.save(tmp_path / "ml.finetune.pt"))
    np.testing.assert_array_equal(again.thresholds_, head.thresholds_)
    np.testing.assert_allclose(again.predict_proba(Xv), proba, atol=1e-5)
    np.testing.assert_array_equal(again.predict(Xv), head.predict(Xv))
