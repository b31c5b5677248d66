"""What every head shares: scikit-learn's estimator conventions, checks, saving and loading.

Parameters live in ``__init__`` and are stored untouched (so ``sklearn.base.clone`` works);
they are checked when a head is made through the registry and again when ``fit`` starts,
so a bad value stops a run before any training. What is learned ends in ``_`` and is set by
``fit``, which returns ``self``; ``predict_proba`` gives one column per entry of
``classes_``. ``fit`` takes an optional ``eval_set=(X_val, y_val)``, used for model
selection and early stopping, never for the weights themselves.

Multi-label: ``y`` is an (n, L) 0/1 indicator matrix (scikit-learn's convention); the head
then gives every label an independent probability, ``predict_proba`` returns (n, L),
``classes_`` is ``0..L-1``, and ``fit_thresholds`` sets each label's decision threshold
(``thresholds_``) from validation data; ``predict`` returns the (n, L) predicted sets. ``input`` says what X is:
a pooled matrix, a :class:`heads.features.Residues` view of per-residue arrays, or
sequences.

This module imports no concrete head: the registry (:mod:`heads.registry`) imports them all.
"""

from __future__ import annotations

import importlib
import inspect
import io
import logging
import numbers
import textwrap
import tokenize
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import joblib
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from embedcache import __version__
from embedcache.atomic import atomic_path

log = logging.getLogger(__name__)

VALIDATION_METRICS = ("accuracy", "macro_f1", "mcc")


class NewerVersionWarning(UserWarning):
    """A saved head was written by a newer embedcache than the one loading it."""


class Head(ClassifierMixin, BaseEstimator):
    kind: ClassVar[str] = ""  # registry name, recorded in every saved file
    title: ClassVar[str] = ""  # how figures and reports name it
    input: ClassVar[str] = "pooled"  # pooled | per_residue | sequence
    file_suffix: ClassVar[str] = ".joblib"
    # Attributes that exist only once fit has finished.
    fitted_attributes: ClassVar[tuple[str, ...]] = ("classes_",)
    # Parameter checks: name -> function returning what the value should be, or None when it is fine.
    constraints: ClassVar[dict[str, Callable[[object], str | None]]] = {}
    # The parameter that sets the head's CPU threads (None: it has none of its own), and whether
    # its numbers depend on the thread count: torch's reductions split work by thread, so a
    # count that differs changes the last bits, which training carries on.
    threads_param: ClassVar[str | None] = None
    threads_change_results: ClassVar[bool] = True

    # -- scikit-learn protocol -----------------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        return all(hasattr(self, name) for name in self.fitted_attributes)

    def check_fitted(self) -> None:
        check_is_fitted(self, msg=f"this {type(self).__name__} is not fitted yet: call fit before predicting")

    def predict(self, X) -> np.ndarray:
        """Class labels; multi-label: the (n, L) 0/1 sets (thresholds_, at least one label each)."""
        proba = self.predict_proba(X)
        if getattr(self, "multilabel_", False):
            from .multilabel import DEFAULT_THRESHOLD, label_sets

            return label_sets(proba, getattr(self, "thresholds_", DEFAULT_THRESHOLD)).astype(np.int64)
        return self.classes_[proba.argmax(1)]

    def fit_thresholds(self, X_val, Y_val, proba: np.ndarray | None = None) -> Head:
        """Multi-label: each label's threshold, chosen on validation proteins (``proba``: their
        probabilities when already computed)."""
        from .multilabel import choose_thresholds

        self.check_fitted()
        if not getattr(self, "multilabel_", False):
            raise ValueError(f"{self.kind} head was trained on one label per protein: no thresholds to choose")
        Y_val = check_indicator(np.asarray(Y_val), "validation labels")
        if Y_val.shape[1] != len(self.classes_):
            raise ValueError(f"validation labels have {Y_val.shape[1]} columns, the head {len(self.classes_)} labels")
        self.thresholds_ = choose_thresholds(self.predict_proba(X_val) if proba is None else proba, Y_val)
        return self

    def selection_summary(self) -> dict:
        """What validation chose, for the run's record."""
        return {}

    # -- parameters ----------------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        """In the order ``__init__`` lists them."""
        return [name for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and p.kind != p.VAR_KEYWORD]

    @classmethod
    def param_docs(cls) -> dict[str, tuple[object, str]]:
        """name -> (default, meaning); the meaning is the comment on the ``self.name = name`` line."""
        defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                    if name != "self"}
        return {name: (defaults[name], _init_comments(cls).get(name, "")) for name in cls.param_names()}

    @classmethod
    def check_param_names(cls, params: dict) -> None:
        unknown = sorted(set(params) - set(cls.param_names()))
        if unknown:
            raise ValueError(f"{cls.kind or cls.__name__} has no parameter {', '.join(map(repr, unknown))}; "
                             f"its parameters are {', '.join(cls.param_names())} (`heads params {cls.kind}` "
                             "says what each means)")

    def validate_params(self) -> None:
        """A clear ValueError for the first parameter whose value cannot work."""
        for name, check in self.constraints.items():
            value = getattr(self, name)
            expected = check(value)
            if expected is not None:
                raise ValueError(f"{self.kind} parameter {name} must be {expected}, not {value!r}")

    def use_threads(self, threads: int | None) -> Head:
        """Run with ``threads`` CPU threads (None: the cores free at the time), where the head has a setting."""
        if self.threads_param is not None:
            self.set_params(**{self.threads_param: threads})
        return self

    # -- persistence ---------------------------------------------------------------------
    def payload(self) -> dict:
        """What a saved file records besides the head itself."""
        out = {"kind": self.kind, "version": __version__, "multilabel": bool(getattr(self, "multilabel_", False))}
        if hasattr(self, "thresholds_"):
            out["thresholds"] = [float(t) for t in self.thresholds_]
        return out

    def save(self, path: Path | str) -> Path:
        self.check_fitted()
        path = Path(path)
        with atomic_path(path) as tmp:
            joblib.dump({**self.payload(), "head": self}, tmp)
        return path

    @classmethod
    def load(cls, path: Path | str, **options) -> Head:
        """A saved head of any kind: the kind recorded in the file picks the class that reads it.

        Files without a kind (written before heads recorded one) are recognised as before:
        ``.finetune.pt`` fine-tuning, other ``.pt`` attention, anything else joblib.
        """
        path = Path(path)
        kind, data = read_saved(path)
        target = head_class(kind)
        if cls is not Head and not issubclass(target, cls):
            raise ValueError(f"{path} holds a {kind} head, not a {cls.kind or cls.__name__} head")
        check_version(data, path)
        head = target.from_saved(data, path, **options)
        if isinstance(data, dict):
            if data.get("multilabel"):
                head.multilabel_ = True
            if data.get("thresholds") is not None:
                head.thresholds_ = np.asarray(data["thresholds"], dtype=np.float64)
        return head

    @classmethod
    def from_saved(cls, data, path: Path, **options) -> Head:
        head = data["head"] if isinstance(data, dict) else data
        if not isinstance(head, cls):
            # ValueError, not TypeError: the wrong type is in a file, not an argument.
            raise ValueError(f"{path}: holds {type(head).__name__}, not a {cls.__name__}")
        if not hasattr(head, "n_features_in_") and hasattr(getattr(head, "model_", None), "n_features_in_"):
            head.n_features_in_ = head.model_.n_features_in_  # saved before heads recorded it
        return head


# -- loading -----------------------------------------------------------------------------
def read_saved(path: Path) -> tuple[str, object]:
    """(kind, contents) of a saved head; a clear ValueError for anything else."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such saved head")
    if zipfile.is_zipfile(path):  # torch.save's format
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged file fails in many ways: zip, pickle, storage
            raise ValueError(f"{path}: not a readable saved head ({type(err).__name__}: {err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a saved head")
        kind = data.get("kind") or ("finetune" if path.name.endswith(".finetune.pt") else "attention")
        return kind, data
    try:
        data = joblib.load(path)
    except Exception as err:  # as above
        raise ValueError(f"{path}: not a readable saved head ({type(err).__name__}: {err})") from None
    if isinstance(data, dict) and "kind" in data:
        return data["kind"], data
    if isinstance(data, Head) and data.kind:
        return data.kind, data
    raise ValueError(f"{path}: not a saved head")


def head_class(kind: str) -> type[Head]:
    """The class registered under ``kind``, importing the registry when it is not loaded yet.

    The registry imports every concrete head and they import this module, so the registry is
    found by name at call time rather than imported here.
    """
    found = _subclass_of_kind(kind)
    if found is None:
        importlib.import_module("heads.registry")
        found = _subclass_of_kind(kind)
    if found is None:
        raise ValueError(f"saved head of unknown kind {kind!r}")
    return found


def _subclass_of_kind(kind: str) -> type[Head] | None:
    pending = list(Head.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls.__dict__.get("kind") == kind:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def check_version(data, path: Path) -> None:
    saved = data.get("version") if isinstance(data, dict) else None
    if saved is None:
        return
    if _version_tuple(saved) > _version_tuple(__version__):
        warnings.warn(f"{path} was saved by embedcache {saved}, newer than this {__version__}; "
                      "it may not load or predict as it did there", NewerVersionWarning, stacklevel=3)


def _version_tuple(version: str) -> tuple:
    from packaging.version import InvalidVersion, Version

    try:
        return (Version(str(version)),)
    except InvalidVersion:
        return (Version("0"),)


# -- inputs ------------------------------------------------------------------------------
def check_pooled(head: Head, X, fitting: bool, validation: bool = False) -> np.ndarray:
    """X as a finite float32 (proteins, dimensions) matrix of the width the head was trained on.

    ``fitting``: X sets the width; ``validation``: the eval set of a fit in progress.
    """
    try:
        X = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{head.kind} head expects a numeric matrix of pooled embeddings ({err})") from None
    if X.ndim != 2:
        raise ValueError(f"{head.kind} head expects a 2-D matrix (proteins x dimensions), got shape {X.shape}")
    if len(X) == 0:
        raise ValueError(f"{head.kind} head got no {'validation ' if validation else ''}proteins")
    if fitting:
        head.n_features_in_ = X.shape[1]
    else:
        if not validation:
            head.check_fitted()
        check_width(head, X.shape[1])
    bad = ~np.isfinite(X).all(1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{len(rows)} of {len(X)} proteins have NaN or infinite embedding values (first: row "
                         f"{rows[0]}); an fp16 cache overflows for some models: extract with --dtype float32")
    return X


def check_width(head: Head, width: int) -> None:
    if getattr(head, "n_features_in_", None) is not None and width != head.n_features_in_:
        raise ValueError(f"{head.kind} head was trained on {head.n_features_in_}-dimensional embeddings, got "
                         f"{width}: embeddings from another model or layer?")


def check_finite_batch(arrays: list[np.ndarray], index) -> None:
    """Per-residue arrays of one batch, checked as they are read."""
    for i, a in zip(index, arrays):
        if not np.isfinite(a).all():
            raise ValueError(f"protein {int(i)} has NaN or infinite per-residue embedding values; an fp16 cache "
                             "overflows for some models: extract with --dtype float32")


def _label_kind(values: np.ndarray) -> set[str]:
    if values.dtype.kind in "biuf":
        return {"number"}
    if values.dtype.kind in "US":
        return {"string"}
    kinds = set()
    for v in values.tolist():
        if v is None or (isinstance(v, float) and np.isnan(v)):
            kinds.add("missing")
        elif isinstance(v, (numbers.Number, np.number)) and not isinstance(v, bool):
            kinds.add("number")
        elif isinstance(v, (str, bytes, np.str_)):
            kinds.add("string")
        else:
            kinds.add(type(v).__name__)
    return kinds


def _as_labels(y, name: str) -> np.ndarray:
    if isinstance(y, (list, tuple)):
        y = np.array(y, dtype=object)  # numpy would turn [1, "a"] into strings silently
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be one label per protein (1-D), got shape {y.shape}")
    return y


def check_indicator(Y: np.ndarray, name: str) -> np.ndarray:
    """An (n, L) matrix of 0/1 as int64, or a clear error."""
    if Y.ndim != 2 or Y.shape[1] < 1:
        raise ValueError(f"{name} must be an (proteins, labels) 0/1 matrix, got shape {Y.shape}")
    try:
        values = Y.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: a multi-label matrix holds 0 and 1 only") from None
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError(f"{name}: a multi-label matrix holds 0 and 1 only")
    return values.astype(np.int64)


def check_multilabel(y, eval_set=None, n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """classes_ (0..L-1), training and validation 0/1 matrices, for a multi-label fit."""
    Y = check_indicator(np.asarray(y), "y")
    if n is not None and len(Y) != n:
        raise ValueError(f"{n} proteins but {len(Y)} label rows")
    Y_val = None
    if eval_set is not None:
        Y_val = check_indicator(np.asarray(eval_set[1]), "eval_set labels")
        if len(Y_val) == 0:
            raise ValueError("the validation set (eval_set) holds no proteins; pass eval_set=None to train "
                             "without one")
        if Y_val.shape[1] != Y.shape[1]:
            raise ValueError(f"validation labels have {Y_val.shape[1]} columns, training labels {Y.shape[1]}")
    return np.arange(Y.shape[1]), Y, Y_val


def is_multilabel(y) -> bool:
    """y as scikit-learn's multi-label indicator matrix (2-D), not one label per protein."""
    return np.ndim(y) == 2


def check_labels(y, eval_set=None, n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """classes_ (every label seen in training or validation), training targets, validation targets.

    Clear errors for: one class only, labels that mix numbers and strings (also between
    training and validation), missing labels, an empty validation set, a length mismatch.
    A 2-D ``y`` is multi-label (see :func:`check_multilabel`).
    """
    if is_multilabel(y):
        return check_multilabel(y, eval_set, n)
    y = _as_labels(y, "y")
    if n is not None and len(y) != n:
        raise ValueError(f"{n} proteins but {len(y)} labels")
    parts = [y]
    if eval_set is not None:
        y_val = _as_labels(eval_set[1], "eval_set labels")
        if len(y_val) == 0:
            raise ValueError("the validation set (eval_set) holds no proteins; pass eval_set=None to train "
                             "without one")
        parts.append(y_val)
    kinds = set().union(*(_label_kind(p) for p in parts))
    if "missing" in kinds:
        raise ValueError("labels include missing values (None or NaN)")
    if len(kinds) > 1:
        raise ValueError(f"labels mix types ({', '.join(sorted(kinds))}); give every label as the same type, "
                         "e.g. all strings")
    if parts[0].dtype == object:
        parts = [p.astype(str) if kinds == {"string"} else p.astype(np.float64) for p in parts]
        if kinds == {"number"} and all(float(v).is_integer() for p in parts for v in p):
            parts = [p.astype(np.int64) for p in parts]
    present = np.unique(parts[0])
    if len(present) < 2:
        shown = present[0] if len(present) else "none"
        raise ValueError(f"training data hold one class ({shown}); a classifier needs at least two")
    classes = np.unique(np.concatenate(parts))
    targets = np.searchsorted(classes, parts[0])
    val_targets = np.searchsorted(classes, parts[1]) if eval_set is not None else None
    return classes, targets, val_targets


# -- parameter checks --------------------------------------------------------------------
def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and bool(np.isfinite(float(v)))


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def integer(low: int, none_ok: bool = False) -> Callable[[object], str | None]:
    def check(v):
        if v is None and none_ok:
            return None
        if _is_int(v) and v >= low:
            return None
        return f"a whole number >= {low}" + (" or null" if none_ok else "")
    return check


def number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False,
           none_ok: bool = False) -> Callable[[object], str | None]:
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    text = f"a number in {lo}{low:g}, {'inf' if high is None else f'{high:g}'}{hi}" + (" or null" if none_ok else "")

    def check(v):
        if v is None and none_ok:
            return None
        if not _is_number(v):
            return text
        if v < low or (low_open and v == low):
            return text
        if high is not None and (v > high or (high_open and v == high)):
            return text
        return None
    return check


def one_of(*allowed) -> Callable[[object], str | None]:
    def check(v):
        if any(v == a and type(v) is type(a) for a in allowed):
            return None
        return f"one of {', '.join(map(repr, allowed))}"
    return check


def class_weight_check(allow_dict: bool = False) -> Callable[[object], str | None]:
    def check(v):
        if v is None or v == "balanced" or (allow_dict and isinstance(v, dict)):
            return None
        return "null or 'balanced'" + (" or a {label: weight} mapping" if allow_dict else "")
    return check


def boolean(v) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def seed_check(v) -> str | None:
    return None if v is None or (_is_int(v) and v >= 0) else "a whole number >= 0 or null"


def path_check(v) -> str | None:
    return None if v is None or isinstance(v, (str, Path)) else "a folder path or null"


METRIC = one_of(*VALIDATION_METRICS)


# -- parameter documentation -------------------------------------------------------------
def _init_comments(cls: type) -> dict[str, str]:
    """``self.x = x  # meaning`` lines of the ``__init__`` that defines the parameters."""
    init = next((k.__dict__["__init__"] for k in cls.__mro__ if "__init__" in k.__dict__), None)
    if init is None:
        return {}
    try:
        source = inspect.getsource(init)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    line_name: dict[int, str] = {}
    tokens = list(tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline))
    for i, tok in enumerate(tokens):
        if (tok.type == tokenize.NAME and tok.string == "self" and i + 3 < len(tokens)
                and tokens[i + 1].string == "." and tokens[i + 3].string == "="):
            line_name[tok.start[0]] = tokens[i + 2].string
        if tok.type == tokenize.COMMENT and tok.start[0] in line_name:
            out[line_name[tok.start[0]]] = tok.string.lstrip("#").strip()
    return out
