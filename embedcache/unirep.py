"""UniRep (Alley et al. 2019), the multiplicative-LSTM protein language model.

The implementation lives in :mod:`embedcache.backbones.unirep`; this module keeps the older
import path.
"""

from __future__ import annotations

from .backbones.unirep import (  # noqa: F401
    AMBIGUOUS_TOKEN,
    LETTERS,
    START_TOKEN,
    UNIREP_SHA256,
    UNIREP_SIZES,
    WEIGHTS_ENV,
    MLSTMLayer,
    UniRep,
    UniRepBackbone,
    build_tiny_unirep,
    find_weights,
    tokenize,
)
