"""Taxonomy-aware labels: species names -> accepted taxa -> rank paths, keys, splits, captions.

Modules: ``names`` (parse what collectors write), ``table`` (load and validate a
GBIF/Darwin Core taxon table), ``resolve`` (names -> accepted species),
``labels`` (rank keys and captions), ``split`` (taxon-aware splits) and
``stage`` (the ``embedpipe taxonomy`` entry point that writes every output).
"""

from embedpipe.core.schemas import TAXONOMY_RANKS as RANKS

__all__ = ["RANKS"]
