"""Explanations of a prediction: relevance maps (gradient × input on the patch tokens)."""

from volumetric.explain.relevance import RelevanceMap, relevance_map, token_relevance
from volumetric.explain.save import map_names, save_relevance, scan_name

__all__ = [
    "RelevanceMap",
    "map_names",
    "relevance_map",
    "save_relevance",
    "scan_name",
    "token_relevance",
]
