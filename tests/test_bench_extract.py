"""scripts/bench_extract.py: the weights it hands esm-cpp are the fair-esm model's, and esm-cpp's outputs match."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embedcache.models import random_esm2

from conftest import SEQUENCES

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_extract.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_extract", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Its dataclass resolves annotations through sys.modules.
    sys.modules["bench_extract"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_extract", None)


@pytest.fixture(scope="module")
def fair():
    model = random_esm2((2, 32, 4), seed=3)
    with torch.no_grad():  # layer norms off identity, so a misplaced one shows
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def fair_outputs(model, sequence: str) -> tuple[np.ndarray, np.ndarray]:
    """fair-esm's logits over all tokens and last-layer states over the residues."""
    tokens = torch.tensor([[model.alphabet.cls_idx, *(model.alphabet.get_idx(c) for c in sequence),
                            model.alphabet.eos_idx]])
    with torch.no_grad():
        out = model(tokens, repr_layers=[model.num_layers])
    return out["logits"][0].numpy(), out["representations"][model.num_layers][0, 1:-1].numpy()


def test_esm_cpp_weights_are_a_masked_lm_directory_with_fair_esm_outputs(bench, fair, tmp_path):
    from transformers import EsmForMaskedLM

    bench.write_esm_cpp_weights(fair, tmp_path / "hf")
    hf = EsmForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    for sequence in SEQUENCES.values():
        logits, states = fair_outputs(fair, sequence)
        ids = torch.tensor([[fair.alphabet.cls_idx, *(fair.alphabet.get_idx(c) for c in sequence),
                             fair.alphabet.eos_idx]])
        with torch.no_grad():
            out = hf(ids, output_hidden_states=True)
        np.testing.assert_allclose(out.logits[0].numpy(), logits, atol=1e-5)
        np.testing.assert_allclose(out.hidden_states[-1][0, 1:-1].numpy(), states, atol=1e-5)


def test_esm_cpp_states_and_packed_logits_match_fair_esm(bench, fair, tmp_path, monkeypatch):
    monkeypatch.setenv("ESM_NUM_THREADS", "1")
    esm_cpp = pytest.importorskip("esm_cpp")
    weights = bench.write_esm_cpp_weights(fair, tmp_path / "hf")
    engine = esm_cpp.Model.load_from_safetensors(str(weights))
    sequences = list(SEQUENCES.values())
    ids = bench.esm_cpp_ids(esm_cpp, fair.alphabet, sequences)
    packed = engine.forward_scheduled(ids)
    for sequence, one, packed_logits in zip(sequences, ids, packed):
        logits, states = fair_outputs(fair, sequence)
        got_logits, got_states = bench.esm_cpp_states(engine, one)
        np.testing.assert_allclose(got_states, states, atol=1e-5)
        np.testing.assert_allclose(got_logits, logits, atol=1e-4)
        np.testing.assert_allclose(packed_logits, got_logits, atol=1e-5)


def test_token_chunks_hold_every_protein_once_within_the_budget(bench):
    ids = [np.zeros(n, dtype=np.int32) for n in (5, 300, 40, 120, 120, 7)]
    chunks = bench.token_chunks(ids, 200)
    assert sorted(len(a) for chunk in chunks for a in chunk) == sorted(len(a) for a in ids)
    assert all(sum(len(a) for a in chunk) <= 200 or len(chunk) == 1 for chunk in chunks)
    assert [len(c) for c in chunks][0] == 1  # the 300-token protein alone


def test_unknown_shape_and_bad_per_shape_counts_are_refused(bench):
    assert bench.resolve_shape("650M") == "esm2_t33_650M_UR50D"
    with pytest.raises(SystemExit, match="unknown shape"):
        bench.resolve_shape("9M")
    assert bench.parse_per_shape("150M=24,esm2_t33_650M_UR50D=8") == {"esm2_t30_150M_UR50D": 24,
                                                                        "esm2_t33_650M_UR50D": 8}
    with pytest.raises(SystemExit, match="SHAPE=N"):
        bench.parse_per_shape("650M=0")
