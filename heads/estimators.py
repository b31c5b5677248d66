"""Heads that learn from frozen embeddings, in scikit-learn's estimator conventions.

Parameters live in ``__init__``; what is learned ends in ``_`` and is set by ``fit``, which
returns ``self``; ``predict_proba`` gives one column per entry of ``classes_``. ``fit``
takes an optional ``eval_set=(X_val, y_val)``, used for model selection and early stopping
(never for the weights themselves). ``input`` says what X is: a pooled matrix, or a
:class:`heads.features.Residues` view of per-residue arrays.
"""

from __future__ import annotations

import copy
import inspect
import logging
from pathlib import Path

import joblib
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from threadpoolctl import threadpool_limits

from .metrics import score

log = logging.getLogger(__name__)


class Head(ClassifierMixin, BaseEstimator):
    input = "pooled"  # pooled | per_residue | sequence
    file_suffix = ".joblib"

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        joblib.dump(self, path)
        return path

    @staticmethod
    def load(path: Path | str) -> Head:
        path = Path(path)
        if path.name.endswith(".finetune.pt"):
            from .finetune import FinetuneHead

            return FinetuneHead.load(path)
        if path.suffix == ".pt":
            from .attention import AttentionHead

            return AttentionHead.load(path)
        return joblib.load(path)

    def selection_summary(self) -> dict:
        """What validation chose, for the run's record."""
        return {}


class LogisticHead(Head):
    """Multinomial logistic regression on standardised pooled embeddings.

    The inverse regularisation strength C is chosen on the validation set from ``Cs``; fits
    go from strong to weak regularisation, each warm-started from the last.
    """

    def __init__(self, Cs=(0.001, 0.01, 0.1, 1.0, 10.0), class_weight=None, max_iter=2000,
                 metric="macro_f1", random_state=0):
        self.Cs = Cs
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.metric = metric
        self.random_state = random_state

    def fit(self, X, y, eval_set=None):
        # These matrices are small: two BLAS threads contending with torch's pool ran lbfgs 14x
        # slower than one (10.5 vs 0.75 ms per iteration at 680 x 320, 6 classes).
        with threadpool_limits(1, user_api="blas"):
            return self._fit(X, y, eval_set)

    def _fit(self, X, y, eval_set):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        X = np.asarray(X, dtype=np.float32)
        self.scaler_ = StandardScaler().fit(X)
        Xs = self.scaler_.transform(X)
        Cs = sorted(self.Cs)
        if eval_set is None:
            Cs = [Cs[len(Cs) // 2]]
        model = LogisticRegression(max_iter=self.max_iter, class_weight=self.class_weight,
                                   random_state=self.random_state, warm_start=True)
        self.validation_scores_ = {}
        best = None
        for C in Cs:
            model.set_params(C=C)
            model.fit(Xs, y)
            if eval_set is not None:
                pred = model.classes_[model.predict_proba(self.scaler_.transform(eval_set[0])).argmax(1)]
                value = score(np.asarray(eval_set[1]), pred, self.metric, int(max(y.max(), np.max(eval_set[1])) + 1))
                self.validation_scores_[C] = value
                if best is None or value > best[0]:
                    best = (value, C, copy.deepcopy(model))
            else:
                best = (None, C, copy.deepcopy(model))
        _, self.C_, self.model_ = best
        self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, X):
        with threadpool_limits(1, user_api="blas"):
            return self.model_.predict_proba(self.scaler_.transform(np.asarray(X, dtype=np.float32)))

    def selection_summary(self):
        return {"C": self.C_, "validation_scores": {str(k): v for k, v in self.validation_scores_.items()}}


class LightGBMHead(Head):
    """Gradient-boosted trees on pooled embeddings; boosting stops early on the validation loss."""

    def __init__(self, n_estimators=500, learning_rate=0.1, num_leaves=15, min_child_samples=20,
                 colsample_bytree=0.3, subsample=0.8, reg_lambda=1.0, max_bin=63, early_stopping_rounds=25,
                 class_weight=None, n_jobs=None, random_state=0):
        self.n_estimators = n_estimators  # upper bound on boosting rounds; early stopping usually ends sooner
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.colsample_bytree = colsample_bytree  # share of embedding dimensions each tree sees
        self.subsample = subsample
        self.reg_lambda = reg_lambda
        self.max_bin = max_bin  # histogram bins per feature: 63 trains ~2x faster than 255 at no loss here
        self.early_stopping_rounds = early_stopping_rounds
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X, y, eval_set=None):
        import lightgbm as lgb

        from embedcache.extract import available_cores

        self.model_ = lgb.LGBMClassifier(
            n_estimators=self.n_estimators, learning_rate=self.learning_rate, num_leaves=self.num_leaves,
            min_child_samples=self.min_child_samples, colsample_bytree=self.colsample_bytree,
            subsample=self.subsample, subsample_freq=1, reg_lambda=self.reg_lambda, max_bin=self.max_bin,
            class_weight=self.class_weight, n_jobs=self.n_jobs or available_cores(),
            random_state=self.random_state, verbose=-1,
        )
        callbacks = []
        kwargs = {}
        if eval_set is not None:
            X_val, y_val = np.asarray(eval_set[0], dtype=np.float32), np.asarray(eval_set[1])
            if "eval_X" in inspect.signature(self.model_.fit).parameters:  # lightgbm >= 4.7
                kwargs.update(eval_X=(X_val,), eval_y=(y_val,))
            else:
                kwargs["eval_set"] = [(X_val, y_val)]
            callbacks.append(lgb.early_stopping(self.early_stopping_rounds, verbose=False))
        self.model_.fit(np.asarray(X, dtype=np.float32), y, callbacks=callbacks, **kwargs)
        self.classes_ = self.model_.classes_
        self.best_iteration_ = int(self.model_.best_iteration_ or self.n_estimators)
        return self

    def predict_proba(self, X):
        return self.model_.predict_proba(np.asarray(X, dtype=np.float32))

    def selection_summary(self):
        return {"best_iteration": self.best_iteration_}


def head_registry() -> dict[str, type[Head]]:
    from .attention import AttentionHead
    from .finetune import FinetuneHead

    return {"logreg": LogisticHead, "lightgbm": LightGBMHead, "attention": AttentionHead, "finetune": FinetuneHead}


def make_head(name: str, params: dict | None = None) -> Head:
    registry = head_registry()
    if name not in registry:
        raise ValueError(f"unknown head {name!r}; choose from {', '.join(registry)}")
    return registry[name](**(params or {}))
