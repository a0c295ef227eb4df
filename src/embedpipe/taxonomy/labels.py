"""Integer keys per rank and BioCLIP-style captions for resolved species.

A rank's key is the position of the taxon's lineage (its names from kingdom
down to that rank) in the sorted list of all lineages at that rank, so the
same species set always gives the same keys, and two genera that share a name
in different families get different keys. A rank the table does not give is
labelled MISSING_KEY (-1), for losses that ignore it.
"""

from embedpipe.taxonomy import RANKS
from embedpipe.taxonomy.tree import Path

MISSING_KEY = -1
LINEAGE_SEPARATOR = "|"


def lineage(path: Path, rank: str) -> str | None:
    if not path.get(rank):
        return None
    upto = RANKS[: RANKS.index(rank) + 1]
    return LINEAGE_SEPARATOR.join(path.get(r) or "" for r in upto)


def rank_keys(paths: list[Path]) -> dict[str, dict[str, int]]:
    keys = {}
    for rank in RANKS:
        lineages = sorted({value for p in paths if (value := lineage(p, rank)) is not None})
        keys[rank] = {value: key for key, value in enumerate(lineages)}
    return keys


def key_of(keys: dict[str, dict[str, int]], path: Path, rank: str) -> int:
    value = lineage(path, rank)
    return MISSING_KEY if value is None else keys[rank][value]


def taxonomic_name(path: Path) -> str:
    """``Animalia Arthropoda Insecta Lepidoptera Nymphalidae Danaus plexippus``."""
    higher = [path.get(rank) for rank in RANKS[:-2]]
    species = path.get("species") or ""
    genus = path.get("genus")
    if genus and not species.startswith(genus + " "):
        higher.append(genus)
    return " ".join(part for part in (*higher, species) if part)


def caption(path: Path, common_name: str | None) -> str:
    text = f"a photo of {taxonomic_name(path)}"
    return f"{text} with common name {common_name}" if common_name else text
