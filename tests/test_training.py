"""The training loop the torch heads share: resume, seeding, checkpoints, logs, schedule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from heads import training
from heads.attention import AttentionHead
from heads.features import ArrayResidues
from heads.training import lr_factor


def residue_task(n: int, seed: int, dim: int = 8):
    """Proteins of 5-40 residues; class k shifts channel k of every residue."""
    rng = np.random.default_rng(seed)
    arrays, labels = [], []
    for i in range(n):
        label = i % 3
        a = rng.normal(size=(int(rng.integers(5, 40)), dim)).astype(np.float32)
        a[:, label] += 1.0
        arrays.append(a)
        labels.append(label)
    return ArrayResidues(arrays), np.array(labels)


@pytest.fixture(scope="module")
def task():
    return residue_task(45, 0), residue_task(24, 1)


@pytest.fixture(scope="module")
def whole(task, tmp_path_factory):
    """An uninterrupted fit with checkpoints, and its folder."""
    (X, y), (Xv, yv) = task
    folder = tmp_path_factory.mktemp("whole")
    return attention(checkpoint_dir=str(folder)).fit(X, y, eval_set=(Xv, yv)), folder


def attention(**params) -> AttentionHead:
    settings = {"heads": 2, "hidden": 8, "max_epochs": 3, "patience": 10, "batch_tokens": 200, "threads": 1,
                "dropout": 0.2}
    return AttentionHead(**{**settings, **params})


def crash_after(monkeypatch, n: int) -> list[int]:
    """Make the n-th checkpoint save of the next fit end it, as a kill right after saving would."""
    saves: list[int] = []
    crashed = []
    real = training.save_checkpoint

    def save(folder, state):
        real(folder, state)
        saves.append(state["epoch"])
        if len(saves) == n and not crashed:
            crashed.append(True)
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(training, "save_checkpoint", save)
    return saves


@pytest.mark.parametrize("crash_epoch", [1, 2])
def test_attention_resumes_after_a_crash_at_any_epoch_and_matches_the_uninterrupted_fit(task, whole, tmp_path,
                                                                                        monkeypatch, caplog,
                                                                                        crash_epoch):
    (X, y), (Xv, yv) = task
    whole, whole_folder = whole
    folder = tmp_path / "cut"
    saves = crash_after(monkeypatch, crash_epoch)
    with pytest.raises(KeyboardInterrupt):
        attention(checkpoint_dir=str(folder)).fit(X, y, eval_set=(Xv, yv))
    saves.clear()
    caplog.set_level("INFO", logger="heads.training")
    resumed = attention(checkpoint_dir=str(folder)).fit(X, y, eval_set=(Xv, yv))
    assert saves == list(range(crash_epoch + 1, 4))  # only the missing epochs ran
    assert f"{crash_epoch} epoch(s) done" in caplog.text
    assert [r["epoch"] for r in resumed.history_] == [1, 2, 3]
    for a, b in zip(whole.history_, resumed.history_):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert resumed.best_epoch_ == whole.best_epoch_
    np.testing.assert_allclose(resumed.predict_proba(Xv), whole.predict_proba(Xv), atol=1e-5)
    steps = pd.read_csv(folder / "steps.csv")
    assert steps["step"].tolist() == list(range(1, len(steps) + 1))
    np.testing.assert_allclose(steps["loss"], pd.read_csv(whole_folder / "steps.csv")["loss"], rtol=1e-5)
    assert pd.read_csv(folder / "epochs.csv")["epoch"].tolist() == [1, 2, 3]
    assert (folder / "curves.png").stat().st_size > 0
    assert not list(folder.glob("*.tmp*"))  # every file was written whole
    saves.clear()
    again = attention(checkpoint_dir=str(folder)).fit(X, y, eval_set=(Xv, yv))  # finished: not trained again
    assert saves == []
    np.testing.assert_allclose(again.predict_proba(Xv), whole.predict_proba(Xv), atol=1e-5)


def test_two_crashes_in_a_row_still_resume_to_the_same_model(task, whole, tmp_path, monkeypatch):
    (X, y), (Xv, yv) = task
    whole, _ = whole
    folder = tmp_path / "cut"
    crash_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        attention(checkpoint_dir=str(folder)).fit(X, y, eval_set=(Xv, yv))
    monkeypatch.undo()
    crash_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        attention(checkpoint_dir=str(folder)).fit(X, y, eval_set=(Xv, yv))
    monkeypatch.undo()
    resumed = attention(checkpoint_dir=str(folder)).fit(X, y, eval_set=(Xv, yv))
    np.testing.assert_allclose(resumed.predict_proba(Xv), whole.predict_proba(Xv), atol=1e-5)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_checkpoint_is_retrained_with_a_warning(task, whole, tmp_path, monkeypatch, caplog, damage):
    (X, y), (Xv, yv) = task
    folder = tmp_path / "cut"
    crash_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        attention(checkpoint_dir=str(folder)).fit(X, y, eval_set=(Xv, yv))
    monkeypatch.undo()
    last = folder / "last.pt"
    data = last.read_bytes()
    last.write_bytes({"garbage": b"not a checkpoint" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    caplog.set_level("WARNING", logger="heads.training")
    resumed = attention(checkpoint_dir=str(folder)).fit(X, y, eval_set=(Xv, yv))
    assert "cannot be read" in caplog.text and "training from the start" in caplog.text
    np.testing.assert_allclose(resumed.predict_proba(Xv), whole[0].predict_proba(Xv), atol=1e-5)


def test_a_checkpoint_of_other_settings_or_data_is_not_resumed(task, tmp_path, caplog):
    (X, y), (Xv, yv) = task
    folder = tmp_path / "run"
    attention(checkpoint_dir=str(folder), max_epochs=1, lr=1e-2).fit(X, y, eval_set=(Xv, yv))
    caplog.set_level("WARNING", logger="heads.training")
    other = attention(checkpoint_dir=str(folder), max_epochs=1).fit(X, y, eval_set=(Xv, yv))
    assert "other settings or data" in caplog.text
    fresh = attention(max_epochs=1).fit(X, y, eval_set=(Xv, yv))
    np.testing.assert_allclose(other.predict_proba(Xv), fresh.predict_proba(Xv), atol=1e-5)
    caplog.clear()
    flipped = np.roll(y, 1)
    attention(checkpoint_dir=str(folder), max_epochs=1).fit(X, flipped, eval_set=(Xv, yv))
    assert "other settings or data" in caplog.text


def test_fit_and_predict_leave_the_callers_random_state_alone_and_repeat_exactly(task):
    (X, y), (Xv, yv) = task
    torch.manual_seed(123)
    np.random.seed(7)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    first = attention(max_epochs=2).fit(X, y, eval_set=(Xv, yv))
    first.predict_proba(Xv)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]
    torch.rand(5)  # the caller's stream moves on; the next fit must not depend on it
    second = attention(max_epochs=2).fit(X, y, eval_set=(Xv, yv))
    np.testing.assert_array_equal(first.predict_proba(Xv), second.predict_proba(Xv))
    assert [r["train_loss"] for r in first.history_] == [r["train_loss"] for r in second.history_]
    other_seed = attention(max_epochs=2, random_state=1).fit(X, y, eval_set=(Xv, yv))
    assert not np.array_equal(other_seed.predict_proba(Xv), first.predict_proba(Xv))


def test_early_stopping_restores_the_best_epoch(task):
    (X, y), (Xv, yv) = task
    head = attention(max_epochs=8, patience=2, lr=3e-2).fit(X, y, eval_set=(Xv, yv))
    keys = [(r["val_macro_f1"], -r["val_loss"]) for r in head.history_]
    best = max(range(len(keys)), key=lambda i: keys[i]) + 1
    assert head.best_epoch_ == best
    assert len(head.history_) == min(8, best + 2)
    from heads.metrics import score

    pred = head.predict_proba(Xv).argmax(1)
    assert score(yv, pred, "macro_f1", 3) == pytest.approx(head.history_[best - 1]["val_macro_f1"])


def test_learning_rate_is_a_pure_function_of_the_step():
    # 10 steps, 2 of warm-up, then linear decay to 0 at the end.
    assert [lr_factor(s, 10, 2, decay=True) for s in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert [lr_factor(s, 10, 0, decay=False) for s in range(10)] == [1.0] * 10
    assert lr_factor(10, 10, 2, decay=True) == 0.0
