"""Labelled files: one label per protein, and labels that mean a class."""

from __future__ import annotations

import pytest

from embedcache.sequences import InputError
from heads.datasets import load_labeled


def test_a_deeplocpro_accession_given_twice_is_refused(tmp_path):
    """Two headers for one accession (two labels, two folds) would put one protein on both sides
    of a split with conflicting labels."""
    path = tmp_path / "dup.fasta"
    path.write_text(">P1|Cytoplasmic|negative|0\nMKTAYIAK\n>P2|Periplasmic|negative|1\nMKVLAAGI\n"
                    ">P1|Periplasmic|negative|2\nMKTAYIAK\n")
    with pytest.raises(InputError, match=r"'P1' appears twice \(lines 1 and 5\)"):
        load_labeled(path)


def test_a_deeploc1_accession_given_twice_is_refused(tmp_path):
    path = tmp_path / "dup.fasta"
    path.write_text(">Q1 Cytoplasm-S\nMKTAYIAK\n>Q2 Nucleus-S\nMKVLAAGI\n>Q1 Nucleus-S\nMKTAYIAK\n")
    with pytest.raises(InputError, match="'Q1' appears twice"):
        load_labeled(path)


@pytest.mark.parametrize("missing", ["NaN", "nan", "NA", "None", "null"])
def test_a_missing_value_as_label_is_refused(tmp_path, missing):
    path = tmp_path / "l.csv"
    path.write_text(f"id,sequence,label\nP1,MKTAYIAK,0\nP2,MKVLAAGI,{missing}\nP3,MKLLVVAA,1\n")
    with pytest.raises(InputError, match=rf"row 3.*label '{missing}'.*missing value"):
        load_labeled(path)


def test_class_names_that_are_empty_are_refused_and_merges_are_logged(tmp_path, caplog):
    path = tmp_path / "l.csv"
    path.write_text("id,sequence,label\nP1,MKTAYIAK,0\nP2,MKVLAAGI,1\nP3,MKLLVVAA,2\n")
    with pytest.raises(InputError, match="empty name"):
        load_labeled(path, class_names={"0": "", "1": "B", "2": "C"})
    data = load_labeled(path, class_names={"0": "A", "1": "A", "2": "C"})
    assert data.classes == ["A", "C"]
    assert "maps '0', '1' to one class 'A'" in caplog.text
