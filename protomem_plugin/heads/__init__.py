"""Classification heads: Partial FC, Prototype Memory and Quality-Aware Prototype Memory."""
from ..registry import register_head
from .base import Head, NonFiniteEmbeddingError
from .partial_fc import PartialFC
from .prototype_memory import MEMORY_DTYPES, NonFinitePrototypeError, PrototypeMemory
from .quality import QUALITY_SOURCES, QualityAwarePrototypeMemory

register_head("partial_fc")(PartialFC)
register_head("prototype_memory")(PrototypeMemory)
register_head("qapm")(QualityAwarePrototypeMemory)

__all__ = [
    "Head", "NonFiniteEmbeddingError", "PartialFC", "PrototypeMemory", "QualityAwarePrototypeMemory",
    "QUALITY_SOURCES", "MEMORY_DTYPES", "NonFinitePrototypeError",
]
