"""Per-residue protein language model embeddings in a resumable, content-addressed HDF5 cache."""

__version__ = "0.1.0"

from .extract import ExtractConfig, ExtractSummary, extract  # noqa: E402
from .store import CacheError, EmbeddingCache  # noqa: E402

__all__ = ["CacheError", "EmbeddingCache", "ExtractConfig", "ExtractSummary", "extract", "__version__"]
