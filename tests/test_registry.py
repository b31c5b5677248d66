"""The backbone registry: files recognised by contents, one precision rule, the cache's own
weights found by sha256, provenance, and reproducible fine-tuning set-up."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from embedcache import backbones
from embedcache.backbones import ModelLoadError, backbone_for_cache, load_backbone, pick_precision
from embedcache.cli import main as embedcache_main
from embedcache.extract import ExtractConfig, extract
from embedcache.models import build_tiny_esm2, sha256_of
from embedcache.store import EmbeddingCache
from embedcache.unirep import build_tiny_unirep
from heads.finetune import FinetuneHead
from heads.run import RunConfig, build_heads

from conftest import SEQUENCES, write_fasta


def test_every_family_is_registered_with_its_own_module():
    assert set(backbones.FAMILIES) == {"esm2", "unirep", "hf-esm2"}
    for key, family in backbones.FAMILIES.items():
        assert family.family == key
        assert family.__module__.startswith("embedcache.backbones.")


def test_files_are_recognised_by_contents_not_names(tmp_path, tiny_weights):
    esm_named_npz = tmp_path / "esm_weights.npz"
    shutil.copy(tiny_weights, esm_named_npz)
    unirep_named_pt = build_tiny_unirep(tmp_path / "unirep_weights.pt")
    unsuffixed = tmp_path / "checkpoint"
    shutil.copy(tiny_weights, unsuffixed)
    assert load_backbone(weights=esm_named_npz).family == "esm2"
    assert load_backbone(weights=unsuffixed).architecture == "ESM-2 3x32x4"
    unirep = load_backbone(weights=unirep_named_pt)
    assert unirep.family == "unirep" and unirep.architecture == "UniRep mLSTM 16x2"


def test_a_text_file_as_weights_is_a_clear_error(tmp_path, fasta):
    notes = tmp_path / "weights.pt"
    notes.write_text("these are my notes, not weights\n")
    with pytest.raises(ModelLoadError, match=r"weights.pt: not model weights: it is a text file"):
        load_backbone(weights=notes)
    result = CliRunner().invoke(embedcache_main, ["extract", str(fasta), str(tmp_path / "o.h5"), "--weights",
                                                  str(notes), "--quiet"])
    assert result.exit_code == 1 and "Error: " in result.output and "not model weights" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o.h5").exists()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="not a fair-esm ESM-2 checkpoint"):
        load_backbone(weights=tmp_path / "other.pt")
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    with pytest.raises(ModelLoadError, match="numpy arrays of no known family"):
        load_backbone(weights=tmp_path / "arrays.npz")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ModelLoadError, match="a directory without a Hugging Face config.json"):
        load_backbone(weights=tmp_path / "empty_dir")
    with pytest.raises(ModelLoadError, match="weights file not found"):
        load_backbone(weights=tmp_path / "absent.pt")


def test_names_and_files_must_agree_and_unknown_names_list_the_known(tmp_path, tiny_weights):
    with pytest.raises(ModelLoadError, match="holds esm2 weights, but --model unirep64 is a unirep model"):
        load_backbone(model="unirep64", weights=tiny_weights)
    with pytest.raises(ModelLoadError, match="unknown model 'esm3'.*esm2_t33_650M_UR50D.*unirep256.*facebook/esm2"):
        load_backbone(model="esm3")
    with pytest.raises(ModelLoadError, match="--weights PATH"):
        load_backbone()


def test_models_command_lists_every_family_through_the_registry():
    listing = CliRunner().invoke(embedcache_main, ["models"]).output
    for row in backbones.known_models():
        assert row["name"] in listing
    assert "esm2_t33_650M_UR50D" in listing and "unirep256" in listing and "facebook/esm2_t6_8M_UR50D" in listing
    assert "TORCH_HOME" in listing and "UNIREP_WEIGHTS_DIR" in listing and "HF_HOME" in listing


def test_one_precision_rule_for_auto(monkeypatch):
    for training in (False, True):
        assert pick_precision("auto", "cpu", training) == "fp32"
        assert pick_precision("bf16", "cpu", training) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_precision("auto", "cuda", False) == pick_precision("auto", "cuda", True) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_precision("auto", "cuda", False) == "fp16"
    assert pick_precision("auto", "cuda", True) == "fp32"  # no fp16 training without a loss scaler
    with pytest.raises(ValueError, match="precision must be auto or one of"):
        pick_precision("fp64", "cpu")


def test_provenance_records_family_pooling_and_an_absolute_weights_path(tmp_path, tiny_weights, monkeypatch):
    shutil.copy(tiny_weights, tmp_path / "tiny.pt")
    monkeypatch.chdir(tmp_path)
    fasta = write_fasta(tmp_path / "p.fasta", {"a": SEQUENCES["short"]})
    extract(fasta, tmp_path / "c.h5", ExtractConfig(weights="tiny.pt", threads=1), progress=False)
    with EmbeddingCache(tmp_path / "c.h5") as cache:
        provenance = cache.info()["provenance"]
    assert provenance["weights"] == str((tmp_path / "tiny.pt").resolve())
    assert provenance["family"] == "esm2" and provenance["pooling"] == "mean over residues"
    assert provenance["weights_sha256"] == sha256_of(tiny_weights)


@pytest.fixture
def moved_cache(tmp_path, tiny_weights):
    """A cache built from a/tiny.pt, then moved with its weights to b/; a different tiny.pt in c/."""
    for folder in "abc":
        (tmp_path / folder).mkdir()
    shutil.copy(tiny_weights, tmp_path / "a" / "tiny.pt")
    fasta = write_fasta(tmp_path / "p.fasta", {"a": SEQUENCES["short"]})
    extract(fasta, tmp_path / "a" / "c.h5", ExtractConfig(weights=str(tmp_path / "a" / "tiny.pt"), threads=1),
            progress=False)
    for name in ("c.h5", "tiny.pt"):
        shutil.move(tmp_path / "a" / name, tmp_path / "b" / name)
    build_tiny_esm2(tmp_path / "c" / "tiny.pt", num_layers=3, embed_dim=32, attention_heads=4, seed=1)
    with EmbeddingCache(tmp_path / "b" / "c.h5") as cache:
        return tmp_path, cache.info()["provenance"]


def test_cache_weights_are_found_next_to_a_moved_cache_by_sha256(moved_cache, monkeypatch):
    root, provenance = moved_cache
    monkeypatch.chdir(root / "c")  # holds a tiny.pt with other weights
    assert backbone_for_cache(provenance, root / "b" / "c.h5") == (None, str(root / "b" / "tiny.pt"))
    config = RunConfig(data="unused.csv", cache=str(root / "b" / "c.h5"), heads=("finetune",))
    head = build_heads(config, provenance)["finetune"]
    assert head.get_params()["weights"] == str(root / "b" / "tiny.pt")


def test_a_file_of_the_same_name_in_the_current_directory_is_never_used(moved_cache, monkeypatch):
    root, provenance = moved_cache
    monkeypatch.chdir(root / "c")
    (root / "b" / "tiny.pt").unlink()
    # Also as caches before absolute paths recorded it: relative to where extraction ran.
    for recorded in (provenance["weights"], "tiny.pt"):
        with pytest.raises(ModelLoadError, match="were not found; looked at: .*never searched") as err:
            backbone_for_cache({**provenance, "weights": recorded}, root / "b" / "c.h5")
        assert str(root / "b" / "tiny.pt") in str(err.value)
    # The same file of the same name beside the cache, but other weights: refused too.
    shutil.copy(root / "c" / "tiny.pt", root / "b" / "tiny.pt")
    with pytest.raises(ModelLoadError, match="other contents"):
        backbone_for_cache(provenance, root / "b" / "c.h5")
    config = RunConfig(data="unused.csv", cache=str(root / "b" / "c.h5"), heads=("finetune",))
    with pytest.raises(ModelLoadError, match="were not found"):
        build_heads(config, provenance)


def test_cache_weights_by_official_name_need_the_official_sum(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    official = {"model": "esm2_t6_8M_UR50D", "architecture": "esm2_t6_8M_UR50D", "weights": "/gone/esm2_t6_8M_UR50D.pt",
                "weights_sha256": backbones.ESM2Backbone.official_sha256("esm2_t6_8M_UR50D")}
    # Not on disk, but loading by name fetches it and checks the same official sum.
    assert backbone_for_cache(official, tmp_path / "c.h5") == ("esm2_t6_8M_UR50D", None)
    with pytest.raises(ModelLoadError, match="not present locally"):
        backbone_for_cache({**official, "weights_sha256": "0" * 64}, tmp_path / "c.h5")
    with pytest.raises(ModelLoadError, match="records no weights sha256"):
        backbone_for_cache({"model": "x"}, tmp_path / "c.h5")


def _trained_state(head):
    return {k: v.clone() for k, v in head.classifier_.trainable_state().items()}


def test_lora_initialisation_follows_random_state(tiny_weights):
    from test_finetune import motif_task

    X, y = motif_task(24, 0)
    states = []
    for global_seed in (1, 2):  # the caller's generator differs; random_state is the same
        torch.manual_seed(global_seed)
        head = FinetuneHead(weights=str(tiny_weights), mode="lora", lora_rank=4, max_epochs=1, lr=3e-3, head_lr=3e-3,
                            batch_tokens=1024, threads=1, random_state=7).fit(X, y)
        states.append(_trained_state(head))
    assert states[0].keys() == states[1].keys() and any("lora_A" in k for k in states[0])
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


def test_building_a_finetune_model_leaves_the_global_generator_alone(tiny_weights):
    for mode in ("lora", "full"):
        torch.manual_seed(11)
        before = torch.get_rng_state()
        FinetuneHead(weights=str(tiny_weights), mode=mode, lora_rank=4, threads=1, random_state=3)._build(2)
        assert torch.equal(torch.get_rng_state(), before), mode
