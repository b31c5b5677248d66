"""--precision int8: int8 weights and per-token int8 activations in the matrix products (CPU only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedcache.backbone import ESM2Backbone
from embedcache.backbones import load_backbone, pick_precision
from embedcache.backbones.hf_esm2 import esm2_to_hf, save_hf_directory
from embedcache.backbones.int8 import Int8Linear
from embedcache.extract import ExtractConfig, extract
from embedcache.models import load_esm2, random_esm2
from embedcache.sequences import read_sequences
from embedcache.store import CacheError, EmbeddingCache
from embedcache.unirep import build_tiny_unirep

from conftest import SEQUENCES, deeplocpro_head

# ESM-2's fair-esm and Hugging Face paths, and UniRep: every family that runs int8.
pytestmark = pytest.mark.filterwarnings("error")  # int8 must not put (deprecation) warnings in users' faces


def _pooled(states: torch.Tensor, seqs: list[str], lead: int = 0) -> list[torch.Tensor]:
    return [states[row, : lead + len(seq)].mean(0) for row, seq in enumerate(seqs)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=0).item()


def test_int8_linear_rows_are_quantized_alone_so_neighbours_never_matter():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    quantized = Int8Linear.of(linear)
    x = torch.randn(5, 64)
    x[2] *= 1000  # a per-tensor activation scale would coarsen every other row's rounding
    with torch.inference_mode():
        together = quantized(x)
        for row in range(5):
            assert torch.equal(quantized(x[row : row + 1])[0], together[row]), row
        exact = linear(x)
    relative = ((together - exact).norm(dim=1) / exact.norm(dim=1)).max().item()
    assert relative < 0.03, relative  # 8-bit weights and activations: ~1% per product on random data


# 128 dims, a realistic width unlike the 32 of the tiny fixture (at 32, 8-bit rounding of so
# few products is coarser than in any real model). Random weights' activations are better
# behaved than trained ESM-2's (no outlier channels), so this bounds the rounding of the
# method, not its effect on a trained model. Measured here: >= 0.99997 (the 8M shape: 0.99995).
def test_int8_keeps_per_protein_pooled_cosine_above_0999(tmp_path):
    model = random_esm2((2, 128, 8), seed=3)
    backbone = ESM2Backbone(model, model.alphabet, "random", "random")
    seqs = [r.sequence[:400] for r in read_sequences(deeplocpro_head(tmp_path, 12))] + list(SEQUENCES.values())
    layer = backbone.num_layers
    with torch.inference_mode():
        exact = backbone.embed(seqs, [layer])[layer]
        backbone.set_precision("int8")
        fast = backbone.embed(seqs, [layer])[layer]
    assert fast.dtype == torch.float32
    assert not torch.equal(fast, exact)  # int8 really ran
    for seq, a, b in zip(seqs, _pooled(exact, seqs), _pooled(fast, seqs)):
        assert _cosine(a, b) >= 0.999, seq


def test_int8_protein_alone_equals_it_inside_a_padded_batch(tmp_path):
    # Activation scales are per token, so batch-mates and padding do not enter a protein's
    # quantization. What remains is fp32's own batch rounding (~1e-6, attention over padded
    # keys) moving a value across an int8 rounding boundary now and then: one int8 step at a
    # few positions, nearly nothing in the pooled vector. Measured on this model: pooled
    # cosine >= 0.9999999 (torch.ao's per-tensor scales: 0.99999); the bounds below leave room.
    model = random_esm2((2, 128, 8), seed=3)
    backbone = ESM2Backbone(model, model.alphabet, "random", "random")
    backbone.set_precision("int8")
    seqs = sorted((r.sequence[:1022] for r in read_sequences(deeplocpro_head(tmp_path, 20))), key=len)
    long, shorts = seqs[-1], seqs[:6]
    with torch.inference_mode():
        for seq in shorts:
            alone = backbone.embed([seq], [2])[2][0]
            batched = backbone.embed([seq, long], [2])[2][0, : len(seq)]
            assert _cosine(alone.mean(0), batched.mean(0)) >= 0.99999, seq
            assert (alone.mean(0) - batched.mean(0)).abs().max().item() <= 2e-3, seq
            # The same batch twice: the same values (no hidden state between calls).
            assert torch.equal(batched, backbone.embed([seq, long], [2])[2][0, : len(seq)])


def test_int8_copies_follow_weight_changes_and_leave_the_fp32_model_alone(tiny_weights):
    loaded = load_esm2(weights=tiny_weights)
    backbone = ESM2Backbone(loaded.model, loaded.alphabet, loaded.name, loaded.architecture)
    keys = set(backbone.model.state_dict())
    backbone.set_precision("int8")
    seq = SEQUENCES["insulin"]
    with torch.inference_mode():
        before = backbone.embed([seq], [3])[3]
    # Outside embed the network is the fp32 one: training, export and state_dict see no int8.
    assert set(backbone.model.state_dict()) == keys
    assert all(type(m) is not Int8Linear for m in backbone.model.modules())
    with torch.no_grad():
        backbone.model.layers[1].fc1.weight.mul_(3.0)  # an in-place change, as an optimiser step makes
    with torch.inference_mode():
        after = backbone.embed([seq], [3])[3]
        backbone.set_precision("int8")  # quantized from scratch
        fresh = backbone.embed([seq], [3])[3]
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.equal(after, fresh)


def test_hugging_face_esm2_runs_int8_like_the_fair_esm_path(tmp_path):
    model = random_esm2((2, 128, 8), seed=5)
    fair = ESM2Backbone(model, model.alphabet, "random", "random")
    hf = load_backbone(weights=save_hf_directory(esm2_to_hf(fair.model), tmp_path / "hf"))
    seqs = list(SEQUENCES.values())
    with torch.inference_mode():
        exact = hf.embed(seqs, [2])[2]
        fair.set_precision("int8")
        hf.set_precision("int8")
        hf_int8, fair_int8 = hf.embed(seqs, [2])[2], fair.embed(seqs, [2])[2]
    for seq, a, b, c in zip(seqs, _pooled(exact, seqs), _pooled(hf_int8, seqs), _pooled(fair_int8, seqs)):
        assert _cosine(a, b) >= 0.999, seq
        assert _cosine(b, c) >= 0.9999, seq  # the same weights quantized the same way


def test_unirep_int8_keeps_pooled_cosine_and_ignores_batch_mates(tmp_path):
    backbone = load_backbone(weights=build_tiny_unirep(tmp_path / "u.npz", hidden=64))
    seqs = list(SEQUENCES.values())
    lead = backbone.leading_states
    with torch.inference_mode():
        exact = backbone.embed(seqs, [2])[2]
        backbone.set_precision("int8")
        fast = backbone.embed(seqs, [2])[2]
        for row, seq in enumerate(seqs):
            # Every step quantizes each protein's state with its own scale, and the rest is
            # elementwise: alone and batched agree to float rounding.
            alone = backbone.embed([seq], [2])[2][0]
            assert torch.allclose(alone, fast[row, : lead + len(seq)], atol=1e-5), seq
    assert not torch.equal(fast, exact)
    for seq, a, b in zip(seqs, _pooled(exact, seqs, lead), _pooled(fast, seqs, lead)):
        assert _cosine(a, b) >= 0.999, seq


def test_int8_is_refused_on_gpu_for_training_and_never_chosen_by_auto(tiny_weights):
    for device in ("cpu", "cuda"):
        for training in (False, True):
            assert pick_precision("auto", device, training) != "int8"
    with pytest.raises(ValueError, match="int8 is for extraction"):
        pick_precision("int8", "cpu", training=True)
    loaded = load_esm2(weights=tiny_weights)
    backbone = ESM2Backbone(loaded.model, loaded.alphabet, loaded.name, loaded.architecture)
    backbone.device = torch.device("cuda")  # no GPU needed: refused before anything runs there
    with pytest.raises(ValueError, match="int8 compute is for CPUs"):
        backbone.set_precision("int8")
    assert backbone.precision == "fp32"
    backbone.device = torch.device("cpu")
    backbone.set_precision("int8")
    with pytest.raises(ValueError, match="int8 is for extraction"):
        backbone.configure_training("full")
    backbone.set_precision("fp32")
    backbone.configure_training("top")
    with pytest.raises(ValueError, match="int8 is for extraction"):
        backbone.set_precision("int8")


def test_finetune_refuses_int8_with_a_clear_message():
    from heads.finetune import FinetuneHead

    head = FinetuneHead(model="esm2_t6_8M_UR50D", precision="int8")
    with pytest.raises(ValueError, match="int8 is for extraction"):
        head.validate_params()


def test_int8_cache_records_int8_and_refuses_mixing_with_fp32(tmp_path, tiny_weights):
    fasta = tmp_path / "p.fasta"
    fasta.write_text("".join(f">{k}\n{v}\n" for k, v in SEQUENCES.items()))
    out = tmp_path / "c.h5"
    extract(fasta, out, ExtractConfig(weights=str(tiny_weights), precision="int8"), progress=False)
    with EmbeddingCache(out) as cache:
        assert cache.attrs["precision"] == "int8"
    with pytest.raises(CacheError, match="precision"):
        extract(fasta, out, ExtractConfig(weights=str(tiny_weights), precision="fp32"), progress=False)
    fp32 = tmp_path / "f.h5"
    extract(fasta, fp32, ExtractConfig(weights=str(tiny_weights)), progress=False)
    with pytest.raises(CacheError, match="precision"):
        extract(fasta, fp32, ExtractConfig(weights=str(tiny_weights), precision="int8"), progress=False)


def test_int8_with_device_auto_runs_on_the_cpu_even_where_a_gpu_is_seen(tmp_path, tiny_weights, monkeypatch):
    # A cache computed in int8 is extended (and heads predict embeds new proteins) with
    # --device auto; on a GPU machine that must mean the CPU, not a refusal or a GPU run.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # any use of CUDA would now fail
    fasta = tmp_path / "p.fasta"
    fasta.write_text("".join(f">{k}\n{v}\n" for k, v in SEQUENCES.items()))
    summary = extract(fasta, tmp_path / "c.h5", ExtractConfig(weights=str(tiny_weights), precision="int8"),
                      progress=False)
    assert summary.embedded == len(SEQUENCES)
