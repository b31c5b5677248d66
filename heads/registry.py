"""Every head by name: the one place that imports them all.

``make_head("logreg", {"Cs": [0.1, 1]})`` checks parameter names and values at once, so a
typo in ``--set`` stops a run before any training, with the valid parameters listed.
"""

from __future__ import annotations

from pathlib import Path

from .attention import AttentionHead
from .base import Head, head_class
from .estimators import LightGBMHead, LogisticHead
from .finetune import FinetuneHead

HEADS: dict[str, type[Head]] = {cls.kind: cls for cls in (LogisticHead, LightGBMHead, AttentionHead, FinetuneHead)}

__all__ = ["HEADS", "Head", "head_class", "load_head", "make_head", "param_table"]


def get_head_class(name: str) -> type[Head]:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose from {', '.join(HEADS)}")
    return HEADS[name]


def make_head(name: str, params: dict | None = None) -> Head:
    """A head with these parameters, names and values checked."""
    cls = get_head_class(name)
    params = dict(params or {})
    cls.check_param_names(params)
    head = cls(**params)
    head.validate_params()
    return head


def load_head(path: Path | str, **options) -> Head:
    return Head.load(path, **options)


def param_table(name: str | None = None) -> list[dict]:
    """Every parameter of every head (or of one): head, name, default, meaning."""
    names = [name] if name else list(HEADS)
    rows = []
    for head in names:
        for param, (default, meaning) in get_head_class(head).param_docs().items():
            rows.append({"head": head, "param": param, "default": default, "meaning": meaning})
    return rows
