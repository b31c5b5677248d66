from __future__ import annotations

import pytest
import torch

from embedcache.backbone import ESM2Backbone
from embedcache.models import load_esm2, random_esm2
from embedcache.sequences import read_sequences

from conftest import SEQUENCES, deeplocpro_head


@pytest.fixture(scope="module")
def backbone(tiny_weights) -> ESM2Backbone:
    loaded = load_esm2(weights=tiny_weights)
    return ESM2Backbone(loaded.model, loaded.alphabet, loaded.name, loaded.architecture)


def test_tokens_equal_fair_esm_batch_converter(backbone):
    seqs = list(SEQUENCES.values())
    _, _, expected = backbone.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(seqs)])
    assert torch.equal(backbone.tokenize(seqs), expected)


def test_J_is_encoded_as_unk_as_the_alphabet_does(backbone):
    # fair-esm's BatchConverter raises KeyError on J; Alphabet.get_idx maps it to <unk>.
    tokens = backbone.tokenize(["MJK"])
    assert tokens[0, 2].item() == backbone.alphabet.unk_idx == backbone.alphabet.get_idx("J")


def test_sdpa_forward_equals_fair_esm_forward(backbone):
    seqs = list(SEQUENCES.values())
    tokens = backbone.tokenize(seqs)
    layers = list(range(backbone.num_layers + 1))
    with torch.inference_mode():
        expected = backbone.model(tokens, repr_layers=layers)["representations"]
        ours = backbone.forward(tokens, layers)
    assert sorted(ours) == layers
    for layer in layers:
        for row, seq in enumerate(seqs):
            n = len(seq) + 2  # padding positions are meaningless in both
            diff = (ours[layer][row, :n] - expected[layer][row, :n]).abs().max().item()
            assert diff <= 1e-5, (layer, row, diff)


def test_forward_stops_at_highest_requested_layer(backbone):
    tokens = backbone.tokenize(["MKTAYIAK"])
    with torch.inference_mode():
        expected = backbone.model(tokens, repr_layers=[1])["representations"][1]
        calls = []
        hook = backbone.model.layers[2].register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            ours = backbone.forward(tokens, [1])[1]
        finally:
            hook.remove()
    assert not calls
    assert torch.allclose(ours, expected, atol=1e-5)


def test_alone_equals_inside_a_padded_batch(backbone):
    seqs = list(SEQUENCES.values())
    with torch.inference_mode():
        batch = backbone.embed(seqs, [1, 3])
        for row, seq in enumerate(seqs):
            alone = backbone.embed([seq], [1, 3])
            for layer in (1, 3):
                assert alone[layer].shape == (1, len(seq), backbone.embed_dim)
                diff = (alone[layer][0] - batch[layer][row, : len(seq)]).abs().max().item()
                assert diff <= 1e-5, (seq, layer, diff)


def test_embed_drops_bos_and_eos(backbone):
    seq = SEQUENCES["insulin"]
    with torch.inference_mode():
        full = backbone.forward(backbone.tokenize([seq]), [3])[3][0]
        residues = backbone.embed([seq], [3])[3][0]
    assert torch.allclose(residues, full[1 : len(seq) + 1])


def test_fp16_compute_is_refused_on_cpu(backbone):
    with pytest.raises(ValueError, match="fp16 compute is for GPUs"):
        backbone.set_precision("fp16")


@pytest.mark.parametrize("shape", [(3, 32, 4), "esm2_t6_8M_UR50D"])
def test_bf16_keeps_per_protein_cosine_above_0999(tmp_path, shape):
    model = random_esm2(shape, seed=3)
    backbone = ESM2Backbone(model, model.alphabet, "random", "random")
    seqs = [r.sequence[:400] for r in read_sequences(deeplocpro_head(tmp_path, 12))] + list(SEQUENCES.values())
    layer = backbone.num_layers
    with torch.inference_mode():
        exact = backbone.embed(seqs, [layer])[layer]
        backbone.set_precision("bf16")
        fast = backbone.embed(seqs, [layer])[layer].float()
    for row, seq in enumerate(seqs):
        a, b = exact[row, : len(seq)].mean(0), fast[row, : len(seq)].mean(0)
        assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() >= 0.999, seq
