from __future__ import annotations

from pathlib import Path

import pytest
import torch

from embedcache.models import build_tiny_esm2

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEEPLOCPRO_SUBSET = SHARED_DATA / "deeplocpro" / "graphpart_subset.fasta"

# Short real proteins (UniProt fragments) plus edge cases: a single residue, ambiguous codes.
SEQUENCES = {
    "P69905": "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHVDDMPNALSALSDLHAHKL",
    "P68871": (
        "MVHLTPEEKSAVTALWGKVNVDEVGGEALGRLLVVYPWTQRFFESFGDLSTPDAVMGNPKVKAHGKKVLGAFSDGLAHLDNLKGTFATLSELHCDKLHVDPENFRLLGNVLV"
        "CVLAHHFGKEFTPPVQAAYQKVVAGVANALAHKYH"
    ),
    "insulin": (
        "MALWMRLLPLLALLALWGPDPAAAFVNQHLCGSHLVEALYLVCGERGFFYTPKTRREAEDLQVGQVELGGGPGAGSLQPLALEGSLQKRGIVEQCCTSICSLYQLENYCN"
    ),
    "short": "MK",
    "one": "W",
    "ambiguous": "MKTXBZUOAYIAKQR",
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Deterministic and never oversubscribed, whatever the machine.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def folds_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test's homology-folds cache in a folder of its own, never the real home's (subprocesses inherit it)."""
    folder = tmp_path_factory.mktemp("folds_cache")
    monkeypatch.setenv("HEADS_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny ESM-2 saved in fair-esm's checkpoint format (no contact-regression file beside it)."""
    return build_tiny_esm2(tmp_path_factory.mktemp("weights") / "tiny_esm2.pt", num_layers=3, embed_dim=32,
                           attention_heads=4)


def write_fasta(path: Path, records: dict[str, str] | list[tuple[str, str]]) -> Path:
    items = records.items() if isinstance(records, dict) else records
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in items))
    return path


@pytest.fixture
def fasta(tmp_path) -> Path:
    return write_fasta(tmp_path / "proteins.fasta", SEQUENCES)


def deeplocpro_head(tmp_path: Path, n: int) -> Path:
    if not DEEPLOCPRO_SUBSET.exists():
        pytest.skip(f"{DEEPLOCPRO_SUBSET} not present (it sits in ../shared/data beside the checkout)")
    lines = DEEPLOCPRO_SUBSET.read_text().splitlines()
    out = tmp_path / f"deeplocpro_first{n}.fasta"
    out.write_text("\n".join(lines[: 2 * n]) + "\n")
    return out
