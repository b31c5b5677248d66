from __future__ import annotations

import urllib.error
import warnings

import pytest
import torch

from embedcache import models
from embedcache.backbone import ESM2Backbone
from embedcache.models import ModelLoadError, build_tiny_esm2, load_esm2


def test_tiny_checkpoint_loads_through_fair_esm_without_regression_file(tiny_weights):
    assert not tiny_weights.with_name(tiny_weights.stem + "-contact-regression.pt").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fair-esm's "Regression weights not found" must not reach users
        loaded = load_esm2(weights=tiny_weights)
    assert loaded.architecture == "ESM-2 3x32x4"
    assert loaded.name == "tiny_esm2"
    assert not loaded.model.training
    assert loaded.sha256 == models.sha256_of(tiny_weights)


def test_checkpoint_holds_fair_esm_layout(tiny_weights):
    data = torch.load(tiny_weights, weights_only=False)
    assert set(data) == {"model", "cfg"}
    assert data["cfg"]["model"].encoder_layers == 3
    assert all(k.startswith("encoder.sentence_encoder.") for k in data["model"])


def test_weights_file_is_recognised_whatever_its_name(tmp_path, tiny_weights):
    renamed = tmp_path / "my_finetuned_model.pt"
    renamed.write_bytes(tiny_weights.read_bytes())
    assert load_esm2(weights=renamed).architecture == "ESM-2 3x32x4"


@pytest.fixture
def hub_model(monkeypatch, tmp_path):
    """Pretend a tiny shape is an official model, with TORCH_HOME pointing at an empty folder."""
    monkeypatch.setitem(models.ESM2_MODELS, "esm2_t2_test_UR50D", (2, 16, 2))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return models.hub_checkpoint_dir() / "esm2_t2_test_UR50D.pt"


def test_model_by_name_is_found_in_torch_home_offline(hub_model, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("must not download when the file is cached")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    build_tiny_esm2(hub_model, num_layers=2, embed_dim=16, attention_heads=2)
    loaded = load_esm2(model="esm2_t2_test_UR50D")
    assert loaded.source == str(hub_model)
    assert loaded.architecture == "esm2_t2_test_UR50D"


def test_missing_model_offline_says_where_it_looked(hub_model, monkeypatch):
    def offline(url, dst, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelLoadError) as err:
        load_esm2(model="esm2_t2_test_UR50D")
    message = str(err.value)
    assert str(hub_model) in message and "--weights PATH" in message and "esm2_t2_test_UR50D.pt" in message
    assert not hub_model.exists()


def test_download_goes_to_the_hub_folder(hub_model, monkeypatch, tmp_path):
    source = build_tiny_esm2(tmp_path / "server.pt", num_layers=2, embed_dim=16, attention_heads=2)

    def fake_download(url, dst, progress=True):
        assert url.endswith("/esm2_t2_test_UR50D.pt")
        with open(dst, "wb") as handle:
            handle.write(source.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert load_esm2(model="esm2_t2_test_UR50D").source == str(hub_model)
    assert hub_model.is_file()


def test_official_name_with_wrong_contents_fails_checksum(tmp_path):
    fake = build_tiny_esm2(tmp_path / "esm2_t6_8M_UR50D.pt")
    with pytest.raises(ModelLoadError, match="sha256 is .* but the official esm2_t6_8M_UR50D.pt has 46f002a9"):
        load_esm2(weights=fake)


def test_unknown_name_and_nothing_given():
    with pytest.raises(ModelLoadError, match="unknown model 'esm3'.*esm2_t33_650M_UR50D"):
        load_esm2(model="esm3")
    with pytest.raises(ModelLoadError, match="--weights PATH"):
        load_esm2()


def test_name_and_file_must_agree(tiny_weights):
    with pytest.raises(ModelLoadError, match="holds ESM-2 3x32x4, not esm2_t6_8M_UR50D"):
        load_esm2(model="esm2_t6_8M_UR50D", weights=tiny_weights)


class _Payload:
    pass


def test_unsafe_pickles_need_trust(tmp_path, tiny_weights):
    data = torch.load(tiny_weights, weights_only=False)
    data["extra"] = _Payload()
    path = tmp_path / "odd.pt"
    torch.save(data, path)
    with pytest.raises(ModelLoadError, match="--trust-weights"):
        load_esm2(weights=path)
    assert load_esm2(weights=path, trust=True).architecture == "ESM-2 3x32x4"


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(ModelLoadError, match="not a readable PyTorch checkpoint"):
        load_esm2(weights=junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(ModelLoadError, match="not a fair-esm ESM-2 checkpoint"):
        load_esm2(weights=other)


def test_backbone_layers_resolve(tiny_weights):
    backbone = ESM2Backbone.load(weights=tiny_weights)
    assert backbone.resolve_layers(None) == [3]
    assert backbone.resolve_layers([-1, 0, 2, 2]) == [0, 2, 3]
    with pytest.raises(ValueError, match="layer 4 out of range"):
        backbone.resolve_layers([4])


def test_older_import_paths_give_the_registry_classes():
    from embedcache import backbone, backbones, unirep

    assert backbone.ESM2Backbone is backbones.FAMILIES["esm2"] and backbone.Backbone is backbones.Backbone
    assert unirep.UniRepBackbone is backbones.FAMILIES["unirep"]
    assert models.ModelLoadError is backbones.ModelLoadError


def test_fair_esm_export_writes_the_same_weights(tmp_path, tiny_weights):
    backbone = ESM2Backbone.load(weights=tiny_weights)
    exported = ESM2Backbone.load(weights=backbone.export(tmp_path / "copy.weights"))
    assert exported.describe()["weights"] == str((tmp_path / "copy.weights").resolve())
    ours, theirs = backbone.module.state_dict(), exported.module.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("contact_head"))
    # torch names the zip's folder after the file, so the bytes (and the sha256) differ with the name.
    same = {k: v for k, v in backbone.identity().items() if k != "weights_sha256"}
    assert same == {k: v for k, v in exported.identity().items() if k != "weights_sha256"}
    assert same["family"] == "esm2" and same["pooling"] == "mean over residues"
