"""The Transformer and its parts. Imports nothing from lmforge but `config`."""

from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import Transformer

__all__ = ["KVCache", "Transformer"]
