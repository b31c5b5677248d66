"""Ensembles of a run's methods, evaluated like one more method on the same splits and proteins.

``mean``: per split, the mean of the members' probabilities of that split's models. ``stack``:
per split, a logistic regression fitted only on that split's validation fold, with the members'
validation probabilities as features, applied to the members' probabilities of the test fold.
Either way the splits that share a test fold are averaged, as :func:`heads.evaluate.cross_validate`
averages a head's models, so every protein gets one prediction from models that never saw it,
and nothing is fitted or chosen on a test fold's labels.

Multi-label: the mean ensemble chooses its per-label thresholds on the mean of the members'
validation probabilities of each split; a stacker fits one logistic regression per label on the
members' probabilities of that label and chooses the thresholds on its own out-of-fold
predictions within the validation fold. A protein's thresholds are the mean of those of the
splits averaged for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedcache.atomic import write_text

from .datasets import LabeledSet
from .evaluate import MethodResult
from .folds import Split
from .multilabel import DEFAULT_THRESHOLD, choose_thresholds
from .rundir import ENSEMBLE, SavedModel

log = logging.getLogger(__name__)

KINDS = ("mean", "stack")
# The stackers' inverse regularisation strength, fixed: the features are a few probabilities per
# member, and a validation fold is often too small to choose C by an inner cross-validation.
STACK_C = 1.0
# Inner folds over the validation fold for a multi-label stacker's out-of-fold predictions
# (fewer where a label has fewer positives or negatives).
INNER_FOLDS = 5
STACKER_FORMAT = 1
STACKER_SUFFIX = ".stack.json"


@dataclass
class Stacker:
    """One split's stacker: logistic regression on the members' probabilities of that split's models."""

    split: str
    members: list[str]  # in feature order
    n_classes: int  # classes (single-label) or labels (multi-label) of the run
    multilabel: bool
    # Single-label: the classes the validation fold held (the rest get probability 0), and one
    # row of weights per class over the features [member 0's classes, member 1's classes, ...]
    # (one row for two classes: the second class's log-odds). Multi-label: one row per label over
    # the members' probabilities of that label.
    classes: list[int]
    coef: np.ndarray
    intercept: np.ndarray
    # Multi-label labels with one outcome in the validation fold: no regression can be fitted,
    # the members' mean probability stands in.
    mean_labels: list[int] = field(default_factory=list)
    thresholds: np.ndarray | None = None  # multi-label: (L,) from out-of-fold predictions on the validation fold

    def predict_proba(self, member_proba: list[np.ndarray]) -> np.ndarray:
        """(n, n_classes) from each member's (n, n_classes) probabilities; NaN rows where any member has NaN."""
        if len(member_proba) != len(self.members):
            raise ValueError(f"stacker {self.split}: {len(member_proba)} members' probabilities for "
                             f"{len(self.members)} members ({', '.join(self.members)})")
        for name, p in zip(self.members, member_proba):
            if p.ndim != 2 or p.shape[1] != self.n_classes:
                raise ValueError(f"stacker {self.split}: {name}'s probabilities have shape {p.shape}, expected "
                                 f"(n, {self.n_classes})")
        n = member_proba[0].shape[0]
        stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_proba])  # (M, n, C)
        ok = np.isfinite(stacked).all(axis=(0, 2))
        out = np.full((n, self.n_classes), np.nan)
        if not ok.any():
            return out
        stacked = stacked[:, ok]
        if self.multilabel:
            z = np.einsum("mnl,lm->nl", stacked, self.coef) + self.intercept
            proba = _sigmoid(z)
            if self.mean_labels:
                proba[:, self.mean_labels] = stacked[:, :, self.mean_labels].mean(0)
            out[ok] = proba
            return out
        features = stacked.transpose(1, 0, 2).reshape(stacked.shape[1], -1)
        z = features @ self.coef.T + self.intercept
        if len(self.classes) == 2:
            positive = _sigmoid(z[:, 0])
            present = np.column_stack([1 - positive, positive])
        else:
            z -= z.max(1, keepdims=True)
            e = np.exp(z)
            present = e / e.sum(1, keepdims=True)
        proba = np.zeros((int(ok.sum()), self.n_classes))
        proba[:, self.classes] = present
        out[ok] = proba
        return out

    def weights(self) -> dict[str, float]:
        """Each member's weight in the stacker: the norm of its coefficients."""
        if self.multilabel:
            return {m: float(np.linalg.norm(self.coef[:, i])) for i, m in enumerate(self.members)}
        c = self.n_classes
        return {m: float(np.linalg.norm(self.coef[:, i * c:(i + 1) * c])) for i, m in enumerate(self.members)}

    def to_json(self) -> str:
        record = {
            "format": STACKER_FORMAT, "kind": "stack", "split": self.split, "members": self.members,
            "n_classes": self.n_classes, "multilabel": self.multilabel, "classes": self.classes,
            "C": STACK_C, "coef": self.coef.tolist(), "intercept": self.intercept.tolist(),
            "mean_labels": self.mean_labels,
            "thresholds": None if self.thresholds is None else self.thresholds.tolist(),
        }
        # Python writes floats so that they read back to the same bits.
        return json.dumps(record, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "stacker") -> Stacker:
        try:
            r = json.loads(text)
            if r.get("kind") != "stack" or r.get("format") != STACKER_FORMAT:
                raise ValueError(f"not a stacker of format {STACKER_FORMAT}")
            out = cls(str(r["split"]), [str(m) for m in r["members"]], int(r["n_classes"]), bool(r["multilabel"]),
                      [int(c) for c in r["classes"]], np.asarray(r["coef"], dtype=np.float64),
                      np.asarray(r["intercept"], dtype=np.float64), [int(j) for j in r["mean_labels"]],
                      None if r["thresholds"] is None else np.asarray(r["thresholds"], dtype=np.float64))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{source}: cannot be read as a stacker ({err})") from None
        features = len(out.members) if out.multilabel else len(out.members) * out.n_classes
        rows = out.n_classes if out.multilabel else (1 if len(out.classes) == 2 else len(out.classes))
        if out.coef.shape != (rows, features) or out.intercept.shape != (rows,):
            raise ValueError(f"{source}: stacker weights of shape {out.coef.shape} for {len(out.members)} members "
                             f"and {out.n_classes} classes")
        # Each checked: a NaN weight would give NaN probabilities, read downstream as class 0
        # or as no label, and an index out of range would fail deep in predict.
        problems = []
        if not (np.isfinite(out.coef).all() and np.isfinite(out.intercept).all()):
            problems.append("weights that are not finite numbers")
        if not all(0 <= c < out.n_classes for c in out.classes) or len(set(out.classes)) != len(out.classes):
            problems.append(f"classes {out.classes} outside 0..{out.n_classes - 1} or repeated")
        if not all(0 <= j < out.n_classes for j in out.mean_labels):
            problems.append(f"mean_labels {out.mean_labels} outside 0..{out.n_classes - 1}")
        if out.multilabel and (out.thresholds is None or out.thresholds.shape != (out.n_classes,)
                               or not np.isfinite(out.thresholds).all()):
            problems.append(f"not {out.n_classes} finite thresholds")
        if problems:
            raise ValueError(f"{source}: a damaged stacker ({'; '.join(problems)})")
        return out


@dataclass
class Combined:
    """An ensemble evaluated on a run's splits: its result, and what `heads predict` needs to repeat it."""

    kind: str  # mean | stack
    members: list[str]
    result: MethodResult
    stackers: list[Stacker] = field(default_factory=list)  # stack: one per split, in the splits' order
    # Mean, multi-label: per split, the thresholds chosen on the members' mean validation probabilities.
    thresholds: dict[str, list[float]] = field(default_factory=dict)

    def record(self, multilabel: bool) -> dict:
        """What the run's manifest keeps of the ensemble (under its sha256)."""
        return {"kind": self.kind, "members": self.members, "multilabel": multilabel,
                "thresholds": self.thresholds or None}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # exp-free: no overflow for large |z|


def describe(kind: str, members: list[str]) -> str:
    """The report's note on how the ensemble row was made."""
    names = ", ".join(members)
    if kind == "mean":
        return f"{ENSEMBLE}: mean of the probabilities of {names}"
    return (f"{ENSEMBLE}: stacking of {names}: per split a logistic regression (C={STACK_C:g}) fitted on the "
            "members' probabilities of the validation fold only, applied to the test fold; splits sharing a test "
            "fold averaged")


def check_kind(kind: str | None, methods: list[str]) -> None:
    """Refuse an unknown ensemble or one of fewer than two methods, before anything is trained."""
    if kind is None:
        return
    if kind not in KINDS:
        raise ValueError(f"ensemble must be one of {', '.join(KINDS)}, not {kind!r}")
    if ENSEMBLE in methods:
        raise ValueError(f"a method is named {ENSEMBLE!r}, the name of the ensemble's row")
    if len(methods) < 2:
        raise ValueError(f"--ensemble combines several methods; this run has one ({', '.join(methods)}). Give more "
                         "heads (heads compare --heads A,B) or a learning-rate sweep (--lr X --lr Y)")


def check_stackable(data: LabeledSet, splits: list[Split]) -> None:
    """A single-label stacker needs two classes in every validation fold: refused before training."""
    if data.multilabel:
        return  # labels with one outcome fall back to the members' mean
    for split in splits:
        present = np.unique(data.labels[split.val])
        if len(present) < 2:
            raise ValueError(f"--ensemble stack: the validation fold of split {split.name} holds one class "
                             f"({data.classes[int(present[0])] if len(present) else 'none'}); a stacker needs at "
                             "least two. Use --ensemble mean")


def _aligned(members: list[MethodResult], data: LabeledSet) -> list[Split]:
    """The members' common splits; refuses members of other proteins, classes or splits."""
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {[m.name for m in members]}")
    shape = (len(data), data.n_classes)
    first = members[0]
    names = [s.name for s, _ in first.split_test]
    if not names:
        raise ValueError(f"{first.name}: no per-split predictions (a reference tool cannot be an ensemble member)")
    for m in members:
        if m.proba.shape != shape:
            raise ValueError(f"{m.name}: probabilities of shape {m.proba.shape}; the ensemble's members must "
                             f"predict the {len(data)} proteins over the same {data.n_classes} classes "
                             f"({', '.join(data.classes)})")
        for kind, entries in (("test", m.split_test), ("validation", m.validation)):
            if [s.name for s, _ in entries] != names:
                raise ValueError(f"{m.name}: {kind} predictions of splits {[s.name for s, _ in entries]}, "
                                 f"{first.name} has {names}; members must share the splits")
            for (s, p), (s0, _) in zip(entries, first.split_test):
                rows = s.test if kind == "test" else s.val
                if p.shape != (len(rows), data.n_classes):
                    raise ValueError(f"{m.name}: {kind} probabilities of split {s.name} have shape {p.shape}, "
                                     f"expected {(len(rows), data.n_classes)}")
                if not (np.array_equal(s.test, s0.test) and np.array_equal(s.val, s0.val)):
                    raise ValueError(f"{m.name}: split {s.name} holds other proteins than {first.name}'s")
    if not first.predicted().any():
        raise ValueError(f"{first.name}: predicted no protein; an ensemble of it would predict none")
    for m in members:
        if not m.predicted().any():
            raise ValueError(f"{m.name}: predicted no protein; an ensemble of it would predict none")
    return [s for s, _ in first.split_test]


def average_splits(per_split: list[tuple[Split, np.ndarray]], n: int, n_classes: int,
                   thresholds: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Test probabilities (and thresholds) of the splits sharing a test fold averaged, as cross_validate does.

    A protein with NaN in any split's probabilities stays NaN (not predicted).
    """
    total = np.zeros((n, n_classes))
    count = np.zeros(n)
    folds = np.full(n, -1)
    summed = np.zeros((n, n_classes)) if thresholds is not None else None
    for i, (split, proba) in enumerate(per_split):
        total[split.test] += proba
        count[split.test] += 1
        folds[split.test] = split.test_fold
        if summed is not None and thresholds is not None:
            summed[split.test] += thresholds[i]
    proba = np.full((n, n_classes), np.nan)
    done = count > 0
    proba[done] = total[done] / count[done, None]
    averaged = None
    if summed is not None:
        averaged = np.full((n, n_classes), np.nan)
        averaged[done] = summed[done] / count[done, None]
        averaged[np.isnan(proba).any(1)] = np.nan
    return proba, folds, averaged


def _mean_of(probas: list[np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(probas), axis=0)


def _finite_rows(p: np.ndarray) -> np.ndarray:
    return np.isfinite(p).all(1)


def mean_ensemble(members: list[MethodResult], data: LabeledSet, name: str = ENSEMBLE) -> Combined:
    """Per split, the mean of the members' probabilities; multi-label thresholds from the mean on validation."""
    splits = _aligned(members, data)
    per_split, validation, thresholds, info = [], [], [], []
    chosen: dict[str, list[float]] = {}
    for i, split in enumerate(splits):
        test = _mean_of([m.split_test[i][1] for m in members])
        val = _mean_of([m.validation[i][1] for m in members])
        per_split.append((split, test))
        validation.append((split, val))
        entry = {"split": split.name, "test_fold": split.test_fold, "val_fold": split.val_fold,
                 "n_val": len(split.val), "n_test": len(split.test), "members": [m.name for m in members]}
        if data.multilabel:
            ok = _finite_rows(val)
            t = (choose_thresholds(val[ok], data.labels[split.val][ok]) if ok.any()
                 else np.full(data.n_classes, DEFAULT_THRESHOLD))
            thresholds.append(t)
            chosen[split.name] = t.tolist()
            entry["thresholds"] = t.tolist()
        info.append(entry)
    proba, folds, averaged = average_splits(per_split, len(data), data.n_classes,
                                            thresholds if data.multilabel else None)
    result = MethodResult(name, proba, folds, splits=info, thresholds=averaged, validation=validation,
                          split_test=per_split)
    return Combined("mean", [m.name for m in members], result, thresholds=chosen)


def fit_stacker(split: Split, member_names: list[str], val_proba: list[np.ndarray], labels: np.ndarray,
                n_classes: int, seed: int = 0) -> Stacker:
    """A stacker for one split, from the members' validation probabilities and the validation labels only."""
    from threadpoolctl import threadpool_limits

    # A few features per member: one BLAS thread is several times faster than many.
    with threadpool_limits(1, user_api="blas"):
        return _fit_stacker(split, member_names, val_proba, labels, n_classes, seed)


def _fit_stacker(split: Split, member_names: list[str], val_proba: list[np.ndarray], labels: np.ndarray,
                 n_classes: int, seed: int) -> Stacker:
    from sklearn.linear_model import LogisticRegression

    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in val_proba])  # (M, n_val, C)
    ok = np.isfinite(stacked).all(axis=(0, 2))
    if not ok.any():
        raise ValueError(f"--ensemble stack: split {split.name}: no validation protein has finite probabilities "
                         f"from every member ({', '.join(member_names)})")
    if not ok.all():
        log.warning("split %s: %d validation proteins without finite probabilities from every member are left out "
                    "of the stacker", split.name, int((~ok).sum()))
    stacked, labels = stacked[:, ok], np.asarray(labels)[ok]
    multilabel = labels.ndim == 2
    if not multilabel:
        features = stacked.transpose(1, 0, 2).reshape(stacked.shape[1], -1)
        present = np.unique(labels)
        if len(present) < 2:
            raise ValueError(f"--ensemble stack: the validation fold of split {split.name} holds one class; a "
                             "stacker needs at least two. Use --ensemble mean")
        model = LogisticRegression(C=STACK_C, max_iter=2000).fit(features, labels)
        return Stacker(split.name, list(member_names), n_classes, False, [int(c) for c in model.classes_],
                       model.coef_.astype(np.float64), model.intercept_.astype(np.float64))
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    n_labels = labels.shape[1]
    coef, intercept = np.zeros((n_labels, len(member_names))), np.zeros(n_labels)
    mean_labels, no_inner = [], []
    oof = np.zeros(labels.shape)
    for j in range(n_labels):
        X, y = stacked[:, :, j].T, labels[:, j]
        positives = int(y.sum())
        if positives in (0, len(y)):
            mean_labels.append(j)
            oof[:, j] = X.mean(1)
            continue
        model = LogisticRegression(C=STACK_C, max_iter=2000).fit(X, y)
        coef[j], intercept[j] = model.coef_[0], model.intercept_[0]
        k = min(INNER_FOLDS, positives, len(y) - positives)
        if k < 2:
            no_inner.append(j)
            continue
        inner = StratifiedKFold(k, shuffle=True, random_state=seed)
        oof[:, j] = cross_val_predict(LogisticRegression(C=STACK_C, max_iter=2000), X, y, cv=inner,
                                      method="predict_proba")[:, 1]
    thresholds = choose_thresholds(oof, labels)
    thresholds[no_inner] = DEFAULT_THRESHOLD  # one positive or negative: no out-of-fold prediction to choose on
    return Stacker(split.name, list(member_names), n_classes, True, list(range(n_labels)), coef, intercept,
                   mean_labels, thresholds)


def stack_ensemble(members: list[MethodResult], data: LabeledSet, seed: int = 0, name: str = ENSEMBLE) -> Combined:
    """Per split, a stacker fitted on the validation fold, applied to the members' test probabilities."""
    splits = _aligned(members, data)
    names = [m.name for m in members]
    per_split, validation, thresholds, info, stackers = [], [], [], [], []
    for i, split in enumerate(splits):
        stacker = fit_stacker(split, names, [m.validation[i][1] for m in members], data.labels[split.val],
                              data.n_classes, seed)
        stackers.append(stacker)
        per_split.append((split, stacker.predict_proba([m.split_test[i][1] for m in members])))
        validation.append((split, stacker.predict_proba([m.validation[i][1] for m in members])))
        entry = {"split": split.name, "test_fold": split.test_fold, "val_fold": split.val_fold,
                 "n_val": len(split.val), "n_test": len(split.test), "C": STACK_C,
                 "member_weights": {k: round(v, 6) for k, v in stacker.weights().items()}}
        if stacker.thresholds is not None:
            thresholds.append(stacker.thresholds)
            entry["thresholds"] = stacker.thresholds.tolist()
        info.append(entry)
    proba, folds, averaged = average_splits(per_split, len(data), data.n_classes,
                                            thresholds if data.multilabel else None)
    result = MethodResult(name, proba, folds, splits=info, thresholds=averaged, validation=validation,
                          split_test=per_split)
    return Combined("stack", names, result, stackers=stackers)


def combine(kind: str, members: list[MethodResult], data: LabeledSet, seed: int = 0) -> Combined:
    if kind == "mean":
        return mean_ensemble(members, data)
    if kind == "stack":
        return stack_ensemble(members, data, seed)
    raise ValueError(f"ensemble must be one of {', '.join(KINDS)}, not {kind!r}")


def save_stackers(combined: Combined, model_dir: Path) -> list[SavedModel]:
    """Write each split's stacker (JSON, whole or not at all) and record it for the run's manifest."""
    model_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for stacker in combined.stackers:
        text = stacker.to_json()
        path = write_text(model_dir / f"{stacker.split}{STACKER_SUFFIX}", text)
        classes = list(range(stacker.n_classes))
        saved.append(SavedModel(combined.result.name, stacker.split, Path(path),
                                hashlib.sha256(text.encode()).hexdigest(), classes, "stack"))
    combined.result.saved = saved
    return saved


def load_stacker(path: Path) -> Stacker:
    return Stacker.from_json(Path(path).read_text(), str(path))


def predict_combined(record: dict, member_splits: dict[str, dict[str, np.ndarray]],
                     stackers: dict[str, Stacker] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The ensemble's probabilities (and multi-label thresholds) from its members' per-split predictions.

    ``member_splits``: member -> split -> that split's model's probabilities on the proteins. As in
    cross-validation, per split the members are combined (mean, or that split's stacker), then
    the splits are averaged; so are the thresholds of the splits.
    """
    members = list(record["members"])
    missing = [m for m in members if m not in member_splits]
    if missing:
        raise ValueError(f"no predictions of ensemble members {', '.join(missing)}")
    names = list(member_splits[members[0]])
    for m in members:
        if sorted(member_splits[m]) != sorted(names):
            raise ValueError(f"ensemble member {m} has models of splits {sorted(member_splits[m])}, "
                             f"{members[0]} of {sorted(names)}")
    per_split, thresholds = [], []
    for split in names:
        probas = [member_splits[m][split] for m in members]
        if record["kind"] == "mean":
            per_split.append(_mean_of(probas))
            if record.get("multilabel"):
                chosen = (record.get("thresholds") or {}).get(split)
                if chosen is None:
                    raise ValueError(f"the ensemble records no thresholds for split {split}")
                thresholds.append(np.asarray(chosen, dtype=np.float64))
        else:
            stacker = (stackers or {}).get(split)
            if stacker is None:
                raise ValueError(f"no stacker for split {split}")
            if stacker.split != split:
                raise ValueError(f"the stacker listed for split {split} was fitted for split {stacker.split}")
            if stacker.members != members:
                raise ValueError(f"the stacker of split {split} combines {', '.join(stacker.members)}, the "
                                 f"ensemble {', '.join(members)}")
            per_split.append(stacker.predict_proba(probas))
            if stacker.thresholds is not None:
                thresholds.append(stacker.thresholds)
    proba = _mean_of(per_split)
    if not record.get("multilabel"):
        return proba, None
    if len(thresholds) != len(per_split):
        raise ValueError("the ensemble records thresholds for only some of its splits")
    return proba, np.broadcast_to(_mean_of(thresholds), proba.shape).copy()
