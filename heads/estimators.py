"""Heads on pooled embeddings: logistic regression and LightGBM (see :mod:`heads.base`).

Multi-label targets get one binary model per label, each selected on its own validation
column (logistic regression: C by average precision; LightGBM: early stopping on the
label's log-loss). A label that is always 0 (or always 1) in training gets that constant.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from threadpoolctl import threadpool_limits

from .base import (
    METRIC,
    Head,
    check_labels,
    check_pooled,
    class_weight_check,
    integer,
    is_multilabel,
    number,
    seed_check,
)
from .metrics import score

log = logging.getLogger(__name__)

__all__ = ["Head", "LightGBMHead", "LogisticHead"]


def _cs_check(value) -> str | None:
    try:
        values = list(value)
    except TypeError:
        values = None
    if values and all(number(0, low_open=True)(c) is None for c in values):
        return None
    return "a non-empty list of positive numbers"


def weights_by_index(class_weight, classes: np.ndarray):
    """``{label: weight}`` as ``{class index: weight}`` (heads train on class indices)."""
    if not isinstance(class_weight, dict):
        return class_weight
    index = {c: i for i, c in enumerate(classes.tolist())}
    unknown = [k for k in class_weight if k not in index]
    if unknown:
        raise ValueError(f"class_weight names labels {unknown} that are not among the labels {classes.tolist()}")
    return {index[k]: w for k, w in class_weight.items()}


class ConstantLabel:
    """A label seen with one value only in training: that value's probability, always."""

    def __init__(self, value: float):
        self.value = float(value)

    def positive_proba(self, X) -> np.ndarray:
        return np.full(len(X), self.value)


def fit_per_label(Y: np.ndarray, fit_one: Callable[[int], Any], name: str) -> list:
    """One binary model per label column (``fit_one(j)``), or a constant where training has one value."""
    models: list = []
    for j in range(Y.shape[1]):
        values = np.unique(Y[:, j])
        if len(values) < 2:
            log.warning("%s: label %d is %d for every training protein; it gets that probability", name, j,
                        int(values[0]))
            models.append(ConstantLabel(values[0]))
        else:
            models.append(fit_one(j))
    return models


def per_label_proba(models: list, X, positive: Callable[[Any, Any], np.ndarray]) -> np.ndarray:
    """(n, L) probabilities: each label's model's probability of 1."""
    return np.column_stack([m.positive_proba(X) if isinstance(m, ConstantLabel) else positive(m, X)
                            for m in models])


class LogisticHead(Head):
    """Multinomial logistic regression on standardised pooled embeddings.

    The inverse regularisation strength C is chosen on the validation set from ``Cs``; fits
    go from strong to weak regularisation, each warm-started from the last.
    """

    kind = "logreg"
    title = "logistic regression"
    # One model and C, or (multi-label) one per label.
    model_: Any
    C_: Any
    validation_scores_: Any
    fitted_attributes = ("classes_", "model_", "scaler_")
    constraints: ClassVar[dict] = {"Cs": _cs_check, "class_weight": class_weight_check(allow_dict=True),
                   "max_iter": integer(1), "metric": METRIC, "random_state": seed_check}

    def __init__(self, Cs=(0.001, 0.01, 0.1, 1.0, 10.0), class_weight=None, max_iter=2000,
                 metric="macro_f1", random_state=0):
        self.Cs = Cs  # inverse regularisation strengths tried; validation picks one (without it: the middle one)
        self.class_weight = class_weight  # null, 'balanced' (inverse class frequency) or {label: weight}
        self.max_iter = max_iter  # lbfgs iterations per fit at most
        self.metric = metric  # what picks C on the validation set: accuracy | macro_f1 | mcc
        self.random_state = random_state  # seed of the solver's (rare) random choices

    def fit(self, X, y, eval_set=None):
        self.validate_params()
        # These matrices are small: two BLAS threads contending with torch's pool ran lbfgs 14x
        # slower than one (10.5 vs 0.75 ms per iteration at 680 x 320, 6 classes).
        with threadpool_limits(1, user_api="blas"):
            return self._fit(X, y, eval_set)

    def _fit(self, X, y, eval_set):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        X = check_pooled(self, X, fitting=True)
        classes, targets, val_targets = check_labels(y, eval_set, len(X))
        X_val = None if eval_set is None else check_pooled(self, eval_set[0], fitting=False, validation=True)
        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X)
        Cs = sorted(self.Cs)
        if eval_set is None:
            Cs = [Cs[len(Cs) // 2]]
        self.multilabel_ = is_multilabel(targets)
        if self.multilabel_:
            return self._fit_labels(Xs, targets, None if X_val is None else scaler.transform(X_val), val_targets,
                                    Cs, scaler, classes)
        # Trained on class indices, so that any label type (strings too) scores the same way.
        weights = weights_by_index(self.class_weight, classes)
        model = LogisticRegression(max_iter=self.max_iter, class_weight=weights,
                                   random_state=self.random_state, warm_start=True)
        self.validation_scores_ = {}
        best: tuple[float | None, float, Any] | None = None  # (validation score, C, model)
        for C in Cs:
            model.set_params(C=C)
            model.fit(Xs, targets)
            if val_targets is not None:  # exactly when there is an eval_set
                pred = model.classes_[model.predict_proba(scaler.transform(X_val)).argmax(1)]
                value = score(val_targets, pred, self.metric, len(classes))
                self.validation_scores_[C] = value
                if best is None or best[0] is None or value > best[0]:
                    best = (value, C, copy.deepcopy(model))
            else:
                best = (None, C, copy.deepcopy(model))
        if best is None:
            raise ValueError("Cs is empty: no regularisation strength to fit")
        _, self.C_, self.model_ = best
        self.scaler_ = scaler
        self.classes_ = classes[self.model_.classes_]
        return self

    def _fit_labels(self, Xs, Y, Xs_val, Y_val, Cs, scaler, classes):
        """One logistic regression per label, C chosen per label by validation average precision."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import average_precision_score

        if self.class_weight is not None and self.class_weight != "balanced":
            raise ValueError("logreg class_weight for multi-label targets must be null or 'balanced' (per label)")
        chosen, scores = [], []

        def fit_one(j):
            model = LogisticRegression(max_iter=self.max_iter, class_weight=self.class_weight,
                                       random_state=self.random_state, warm_start=True)
            best: tuple[float, float, Any] | None = None  # (validation score, C, model)
            label_scores: dict[str, float | None] = {}
            informative = Y_val is not None and len(np.unique(Y_val[:, j])) == 2
            for C in Cs if informative else [Cs[len(Cs) // 2]]:
                model.set_params(C=C)
                model.fit(Xs, Y[:, j])
                value = (float(average_precision_score(Y_val[:, j], model.predict_proba(Xs_val)[:, 1]))
                         if informative else None)
                label_scores[str(C)] = value
                key = -np.inf if value is None else value
                if best is None or key > best[0]:
                    best = (key, C, copy.deepcopy(model))
            if best is None:
                raise ValueError("Cs is empty: no regularisation strength to fit")
            chosen.append(best[1])
            scores.append(label_scores)
            return best[2]

        self.model_ = fit_per_label(Y, fit_one, self.kind)
        self.C_ = chosen
        self.validation_scores_ = scores
        self.scaler_ = scaler
        self.classes_ = classes
        return self

    def predict_proba(self, X):
        X = check_pooled(self, X, fitting=False)
        with threadpool_limits(1, user_api="blas"):
            Xs = self.scaler_.transform(X)
            if getattr(self, "multilabel_", False):
                return per_label_proba(self.model_, Xs, lambda m, x: m.predict_proba(x)[:, 1])
            return self.model_.predict_proba(Xs)

    def selection_summary(self):
        if getattr(self, "multilabel_", False):  # per label: C and validation average precision
            return {"C": self.C_, "validation_scores": self.validation_scores_}
        return {"C": self.C_, "validation_scores": {str(k): v for k, v in self.validation_scores_.items()}}


class LightGBMHead(Head):
    """Gradient-boosted trees on pooled embeddings; boosting stops early on the validation loss."""

    kind = "lightgbm"
    title = "LightGBM"
    model_: Any  # one classifier, or (multi-label) one per label
    best_iteration_: Any
    threads_param = "n_jobs"
    # deterministic=True with force_row_wise gives the same trees for any thread count (a test
    # holds 1 and 2 threads to identical probabilities), so the count is no part of a run's identity.
    threads_change_results = False
    fitted_attributes = ("classes_", "model_")
    constraints: ClassVar[dict] = {
        "n_estimators": integer(1), "learning_rate": number(0, low_open=True), "num_leaves": integer(2),
        "min_child_samples": integer(1), "colsample_bytree": number(0, 1, low_open=True),
        "subsample": number(0, 1, low_open=True), "reg_lambda": number(0), "max_bin": integer(2),
        "early_stopping_rounds": integer(1), "class_weight": class_weight_check(allow_dict=True),
        "n_jobs": integer(1, none_ok=True), "random_state": seed_check,
    }

    def __init__(self, n_estimators=500, learning_rate=0.1, num_leaves=15, min_child_samples=20,
                 colsample_bytree=0.3, subsample=0.8, reg_lambda=1.0, max_bin=63, early_stopping_rounds=25,
                 class_weight=None, n_jobs=None, random_state=0):
        self.n_estimators = n_estimators  # upper bound on boosting rounds; early stopping usually ends sooner
        self.learning_rate = learning_rate  # shrinkage of each tree's contribution
        self.num_leaves = num_leaves  # leaves per tree at most
        self.min_child_samples = min_child_samples  # proteins per leaf at least
        self.colsample_bytree = colsample_bytree  # share of embedding dimensions each tree sees
        self.subsample = subsample  # share of proteins each tree sees (drawn anew for every tree)
        self.reg_lambda = reg_lambda  # L2 penalty on leaf values
        self.max_bin = max_bin  # histogram bins per feature: 63 trains ~2x faster than 255 at no loss here
        self.early_stopping_rounds = early_stopping_rounds  # rounds without a better validation loss before stopping
        self.class_weight = class_weight  # null, 'balanced' (inverse class frequency) or {label: weight}
        self.n_jobs = n_jobs  # threads [the cores free when it starts]
        self.random_state = random_state  # seed of row and column sampling

    def fit(self, X, y, eval_set=None):
        import lightgbm as lgb

        self.validate_params()
        X = check_pooled(self, X, fitting=True)
        classes, targets, val_targets = check_labels(y, eval_set, len(X))
        X_val = None if val_targets is None else check_pooled(self, eval_set[0], fitting=False, validation=True)
        self.multilabel_ = is_multilabel(targets)
        if self.multilabel_:
            if self.class_weight is not None and self.class_weight != "balanced":
                raise ValueError("lightgbm class_weight for multi-label targets must be null or 'balanced' (per label)")
            self.model_ = fit_per_label(targets, lambda j: self._fit_one(
                lgb, X, targets[:, j], None if X_val is None else X_val,
                None if val_targets is None else val_targets[:, j], self.class_weight), self.kind)
            self.classes_ = classes
            self.best_iteration_ = [int(m.best_iteration_ or self.n_estimators) if hasattr(m, "best_iteration_")
                                    else 0 for m in self.model_]
            return self
        self.model_ = self._fit_one(lgb, X, targets, X_val, val_targets, weights_by_index(self.class_weight, classes))
        self.classes_ = classes[self.model_.classes_]
        self.best_iteration_ = int(self.model_.best_iteration_ or self.n_estimators)
        return self

    def _fit_one(self, lgb, X, targets, X_val, val_targets, weights):
        from embedcache.threads import default_threads

        model = lgb.LGBMClassifier(
            n_estimators=self.n_estimators, learning_rate=self.learning_rate, num_leaves=self.num_leaves,
            min_child_samples=self.min_child_samples, colsample_bytree=self.colsample_bytree,
            subsample=self.subsample, subsample_freq=1, reg_lambda=self.reg_lambda, max_bin=self.max_bin,
            class_weight=weights, n_jobs=self.n_jobs or default_threads(),
            random_state=self.random_state, verbose=-1,
            # Same trees on every run: LightGBM otherwise picks row- or column-wise histograms by a
            # timing test, and sums in thread order.
            deterministic=True, force_row_wise=True,
        )
        callbacks: list[Callable[..., Any]] = []
        kwargs: dict[str, Any] = {}
        if val_targets is not None:  # exactly when there is an eval_set
            # Validation proteins of a class absent from training cannot be scored by these trees.
            seen = np.isin(val_targets, targets)
            X_val, y_val = X_val[seen], val_targets[seen]
            if len(y_val):
                if "eval_X" in inspect.signature(model.fit).parameters:  # lightgbm >= 4.7
                    kwargs.update(eval_X=(X_val,), eval_y=(y_val,))
                else:
                    kwargs["eval_set"] = [(X_val, y_val)]
                callbacks.append(lgb.early_stopping(self.early_stopping_rounds, verbose=False))
        model.fit(X, targets, callbacks=callbacks, **kwargs)
        return model

    def predict_proba(self, X):
        X = check_pooled(self, X, fitting=False)
        if getattr(self, "multilabel_", False):
            return per_label_proba(self.model_, X, lambda m, x: m.predict_proba(x)[:, 1])
        return self.model_.predict_proba(X)

    def selection_summary(self):
        return {"best_iteration": self.best_iteration_}
