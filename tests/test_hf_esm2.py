"""ESM-2 in Hugging Face format (transformers' EsmModel) as a third backbone family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from embedcache.backbones import ModelLoadError, backbone_for_cache, load_backbone
from embedcache.backbones.hf_esm2 import KNOWN_SHA256, HFESM2Backbone, esm2_to_hf, save_hf_directory
from embedcache.cli import main as embedcache_main
from embedcache.models import load_esm2, sha256_of
from embedcache.store import EmbeddingCache

from conftest import SEQUENCES, write_fasta

# Different lengths in one padded batch, ambiguous codes, and J (not in the vocabulary: <unk>).
PROTEINS = [*SEQUENCES.values(), "MKJTAYIAKQR"]


@pytest.fixture(scope="module")
def converted(tiny_weights, tmp_path_factory) -> Path:
    """The tiny fair-esm ESM-2 converted to a Hugging Face directory."""
    fair = load_esm2(weights=tiny_weights).model
    return save_hf_directory(esm2_to_hf(fair), tmp_path_factory.mktemp("hf") / "tiny_hf_esm2")


@pytest.fixture(scope="module")
def esmconfig_dir(tmp_path_factory) -> Path:
    """A tiny model built directly from transformers' EsmConfig, saved with save_pretrained."""
    from transformers import EsmConfig, EsmModel

    torch.manual_seed(0)
    config = EsmConfig(vocab_size=33, mask_token_id=32, pad_token_id=1, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=1026,
                       position_embedding_type="rotary", layer_norm_eps=1e-5, token_dropout=True,
                       emb_layer_norm_before=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = EsmModel(config, add_pooling_layer=False)
    with torch.no_grad():
        for module in model.modules():  # layer norms off identity, so every parameter matters
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    folder = tmp_path_factory.mktemp("esmconfig") / "tiny"
    model.save_pretrained(folder)
    return folder


def fake_hub_cache(monkeypatch, root: Path, hub_id: str, source: Path) -> Path:
    """Lay ``source`` out as huggingface_hub's cache does and point the environment at it, offline."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def all_layers(backbone, proteins):
    with torch.inference_mode():
        return backbone.embed(proteins, list(range(backbone.num_layers + 1)))


def test_converted_weights_give_fair_esm_embeddings_at_every_layer(converted, tiny_weights):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "esm" and config["position_embedding_type"] == "rotary"
    assert config["token_dropout"] is True and config["layer_norm_eps"] == 1e-5
    hf = load_backbone(weights=converted)
    fair = load_backbone(weights=tiny_weights)
    assert hf.family == "hf-esm2" and fair.family == "esm2"
    assert (hf.architecture, hf.num_layers, hf.embed_dim) == (fair.architecture, 3, 32)
    assert hf.sha256 == HFESM2Backbone.digest(converted) != sha256_of(converted / "model.safetensors")
    assert torch.equal(hf.tokenize(PROTEINS), fair.tokenize(PROTEINS))
    ours, theirs = all_layers(hf, PROTEINS), all_layers(fair, PROTEINS)
    assert sorted(ours) == [0, 1, 2, 3]
    for layer in ours:
        for row, seq in enumerate(PROTEINS):
            diff = (ours[layer][row, : len(seq)] - theirs[layer][row, : len(seq)]).abs().max().item()
            assert diff <= 1e-5, (layer, seq, diff)


def test_a_protein_alone_equals_it_inside_a_padded_batch(converted):
    hf = load_backbone(weights=converted)
    batch = all_layers(hf, PROTEINS)
    for row, seq in enumerate(PROTEINS):
        alone = all_layers(hf, [seq])
        for layer in batch:
            diff = (alone[layer][0] - batch[layer][row, : len(seq)]).abs().max().item()
            assert diff <= 1e-5, (layer, seq, diff)


def test_extract_takes_a_directory_and_records_the_family(converted, tiny_weights, tmp_path):
    fasta = write_fasta(tmp_path / "p.fasta", SEQUENCES)
    runner = CliRunner()
    for name, weights in (("hf.h5", converted), ("fair.h5", tiny_weights)):
        result = runner.invoke(embedcache_main, ["extract", str(fasta), str(tmp_path / name), "--weights",
                                                 str(weights), "--dtype", "float32", "--threads", "1", "--quiet"])
        assert result.exit_code == 0, result.output
    with EmbeddingCache(tmp_path / "hf.h5") as hf, EmbeddingCache(tmp_path / "fair.h5") as fair:
        provenance = hf.info()["provenance"]
        assert provenance["family"] == "hf-esm2" and provenance["weights"] == str(converted.resolve())
        assert provenance["pooling"] == "mean over residues" and provenance["transformers_version"]
        for ident in SEQUENCES:
            np.testing.assert_allclose(hf.per_residue(ident), fair.per_residue(ident), atol=1e-5)
            np.testing.assert_allclose(hf.pooled([ident]), fair.pooled([ident]), atol=1e-5)


def test_an_esmconfig_model_loads_by_directory_and_by_hub_id_from_the_cache(esmconfig_dir, tmp_path, monkeypatch):
    by_dir = load_backbone(weights=esmconfig_dir)
    assert by_dir.architecture == "ESM-2 2x16x2" and by_dir.name == "tiny"
    snapshot = fake_hub_cache(monkeypatch, tmp_path / "hub", "someone/tiny-esm2", esmconfig_dir)
    by_id = load_backbone(model="someone/tiny-esm2")
    assert by_id.family == "hf-esm2" and by_id.name == "someone/tiny-esm2"
    assert by_id.source == str(snapshot.resolve()) and by_id.sha256 == by_dir.sha256
    a, b = all_layers(by_dir, PROTEINS), all_layers(by_id, PROTEINS)
    for layer in a:
        torch.testing.assert_close(a[layer], b[layer], atol=1e-5, rtol=0)
    # A snapshot directory given as --weights is known by its hub id.
    assert load_backbone(weights=snapshot).name == "someone/tiny-esm2"


def test_hub_id_missing_offline_and_damaged_official_files_are_clear_errors(esmconfig_dir, tmp_path, monkeypatch):
    fake_hub_cache(monkeypatch, tmp_path / "hub", "facebook/esm2_t6_8M_UR50D", esmconfig_dir)
    with pytest.raises(ModelLoadError, match=f"sha256 is .* but the official facebook/esm2_t6_8M_UR50D has "
                                             f"{KNOWN_SHA256['facebook/esm2_t6_8M_UR50D'][:12]}"):
        load_backbone(model="facebook/esm2_t6_8M_UR50D")
    with pytest.raises(ModelLoadError, match="nobody/absent is not in the Hugging Face cache .* HF_HUB_OFFLINE"):
        load_backbone(model="nobody/absent")


def test_non_esm2_directories_are_refused(esmconfig_dir, tmp_path):
    other = tmp_path / "bert"
    shutil.copytree(esmconfig_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="Hugging Face directory of an unsupported model type"):
        load_backbone(weights=other)
    (other / "config.json").write_text(json.dumps({**config, "position_embedding_type": "absolute"}))
    with pytest.raises(ModelLoadError, match="not ESM-2"):
        load_backbone(weights=other)
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_backbone(weights=other)
    with pytest.raises(ModelLoadError, match="bare safetensors file"):
        load_backbone(weights=esmconfig_dir / "model.safetensors")


def test_configure_training_sets_what_each_mode_trains(converted):
    backbone = load_backbone(weights=converted)
    backbone.configure_training("top", top_layers=1)
    trained = {n for n, p in backbone.module.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("encoder.layer.2.", "encoder.emb_layer_norm_after.")) for n in trained)
    backbone.configure_training("full")
    assert not any(p.requires_grad for n, p in backbone.module.named_parameters() if n.startswith("contact_head"))
    assert backbone.module.embeddings.word_embeddings.weight.requires_grad
    backbone.configure_training("lora", lora={"rank": 2, "feed_forward": True})
    trained = {n for n, p in backbone.module.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    adapted = {n.split(".lora_")[0].split("encoder.layer.0.")[-1] for n in trained if "encoder.layer.0." in n}
    assert adapted == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                       "intermediate.dense", "output.dense"}


@pytest.mark.parametrize("mode", ["full", "top", "lora"])
def test_hf_esm2_finetunes_and_exports_a_directory_that_loads_to_the_same_embeddings(converted, mode, tmp_path):
    from heads.finetune import FinetuneHead

    from test_finetune import motif_task

    (X, y), (Xv, yv) = motif_task(40, 0), motif_task(12, 1)
    head = FinetuneHead(weights=str(converted), mode=mode, top_layers=1, lora_rank=4, max_epochs=2, lr=3e-3,
                        head_lr=3e-3, batch_tokens=1024, threads=1).fit(X, y, eval_set=(Xv, yv))
    losses = [r["train_loss"] for r in head.history_]
    assert losses[1] < losses[0]
    exported = head.save_backbone(tmp_path / "finetuned")
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    again = load_backbone(weights=exported)
    assert again.family == "hf-esm2" and again.sha256 != load_backbone(weights=converted).sha256
    proteins = [str(s) for s in Xv[:5]]
    with torch.no_grad():
        expected, mask = head.classifier_.backbone.residue_states(proteins)
        got, _ = again.residue_states(proteins)
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
    # Exported again over itself: replaced whole.
    assert head.save_backbone(exported) == exported.resolve()


def test_cache_weights_found_by_hub_id_in_the_hugging_face_cache(esmconfig_dir, tmp_path, monkeypatch):
    fake_hub_cache(monkeypatch, tmp_path / "hub", "someone/tiny-esm2", esmconfig_dir)
    provenance = {"model": "someone/tiny-esm2", "family": "hf-esm2", "architecture": "ESM-2 2x16x2",
                  "weights": str(tmp_path / "gone"), "weights_sha256": HFESM2Backbone.digest(esmconfig_dir)}
    assert backbone_for_cache(provenance, tmp_path / "c.h5") == ("someone/tiny-esm2", None)
    with pytest.raises(ModelLoadError, match="other contents"):
        backbone_for_cache({**provenance, "weights_sha256": "0" * 64}, tmp_path / "c.h5")


@pytest.mark.parametrize("edit", ["vocabulary", "config"])
def test_an_edited_vocabulary_or_config_is_another_identity(converted, tmp_path, edit):
    """Swapping two letters in vocab.txt, or turning token dropout off, changes the embeddings:
    the identity covers the whole directory, not only model.safetensors."""
    edited = shutil.copytree(converted, tmp_path / "edited")
    if edit == "vocabulary":
        vocab = (edited / "vocab.txt").read_text().split("\n")
        i, j = vocab.index("L"), vocab.index("A")
        vocab[i], vocab[j] = vocab[j], vocab[i]
        (edited / "vocab.txt").write_text("\n".join(vocab))
    else:
        config = json.loads((edited / "config.json").read_text())
        config["token_dropout"] = False
        (edited / "config.json").write_text(json.dumps(config))
    original, changed = load_backbone(weights=converted), load_backbone(weights=edited)
    assert changed.sha256 != original.sha256
    assert sha256_of(edited / "model.safetensors") == sha256_of(converted / "model.safetensors")
    provenance = {"model": "tiny_hf_esm2", "family": "hf-esm2", "weights": str(edited),
                  "weights_sha256": original.sha256}
    with pytest.raises(ModelLoadError, match="other contents"):
        backbone_for_cache(provenance, tmp_path / "c.h5")


def test_missing_tensors_or_a_truncated_safetensors_are_refused(converted, tmp_path):
    """transformers fills missing tensors with random values and only warns; we refuse."""
    from safetensors.torch import load_file, save_file

    missing = shutil.copytree(converted, tmp_path / "missing")
    tensors = load_file(missing / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layer.1." not in k}, missing / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing or of another shape"):
        load_backbone(weights=missing)
    truncated = shutil.copytree(converted, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="do not load"):
        load_backbone(weights=truncated)
