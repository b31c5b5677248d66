from __future__ import annotations

import json

from click.testing import CliRunner

from embedcache.cli import main
from embedcache.store import EmbeddingCache


def test_extract_then_info(tmp_path, fasta, tiny_weights):
    out = tmp_path / "c.h5"
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(fasta), str(out), "--weights", str(tiny_weights), "--layers", "0,-1",
                                  "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "6 IDs, 6 unique sequences; embedded 6 now" in result.output
    info = runner.invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and "layers       [0, 3], dim 32, stored as float16" in info.output
    as_json = json.loads(runner.invoke(main, ["info", str(out), "--json"]).output)
    with EmbeddingCache(out) as cache:
        assert as_json["ids"] == len(cache.ids) == 6


def test_user_errors_are_messages_not_tracebacks(tmp_path, tiny_weights):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">P1\nMK-V\n")
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(bad), str(tmp_path / "o.h5"), "--weights", str(tiny_weights)])
    assert result.exit_code == 1
    assert "Error: " in result.output and "record 1 (line 1, id 'P1'): invalid character '-'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.h5").exists()
    result = runner.invoke(main, ["extract", str(bad), str(tmp_path / "o.h5")])
    assert result.exit_code == 2 and "give --model NAME or --weights PATH" in result.output
    result = runner.invoke(main, ["info", str(tmp_path / "none.h5")])
    assert result.exit_code == 1 and "no such cache file" in result.output


def test_tiny_model_and_models_commands(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["tiny-model", str(tmp_path / "t.pt"), "--layers", "1", "--dim", "16", "--heads", "2"])
    assert result.exit_code == 0 and (tmp_path / "t.pt").exists()
    listing = runner.invoke(main, ["models"]).output
    assert "esm2_t33_650M_UR50D" in listing and "TORCH_HOME" in listing
