"""Parse species names as collectors write them into a canonical ``Genus epithet``.

Rules (also in README):

- Unicode NFKC; underscores become spaces (folder names like ``Danaus_plexippus``);
  runs of whitespace collapse.
- Case: the first word is the genus (``Danaus``), the second the epithet
  (``plexippus``), whatever case they were written in.
- A zoological subgenus in parentheses between them is dropped:
  ``Danaus (Anosia) plexippus`` -> ``Danaus plexippus``.
- Author strings are dropped: from the first word after the epithet that starts
  with an upper-case letter, ``(``, a digit, ``&``, or is an author particle
  (de, von, van, ex, et, ...): ``Danaus plexippus (Linnaeus, 1758)``.
- Subspecies, varieties and forms (``subsp.``, ``ssp.``, ``var.``, ``f.``, or a bare
  third lower-case word) are recorded as ``infraspecific`` and the name resolves
  to its species: labels are species-level.
- Names that cannot be a species are reported with a reason: hybrids (``x``),
  uncertain identifications (``cf.``, ``aff.``), genus-only names (``sp.``, ``spp.``).
"""

import re
import unicodedata
from dataclasses import dataclass

RANK_MARKERS = frozenset(
    {"subsp.", "subsp", "ssp.", "ssp", "var.", "var", "f.", "forma", "subvar.", "morph", "ab."}
)
AUTHOR_PARTICLES = frozenset(
    {
        "de",
        "da",
        "del",
        "della",
        "der",
        "di",
        "du",
        "la",
        "le",
        "van",
        "von",
        "ex",
        "in",
        "et",
        "and",
        "&",
    }
)
QUALIFIERS = frozenset({"cf.", "cf", "aff.", "aff", "nr.", "near", "?"})
UNSPECIFIED = frozenset({"sp.", "sp", "spp.", "spp", "indet.", "indet", "sp.nov."})
HYBRID_SIGN = "\u00d7"  # the multiplication sign botanists write before hybrids
HYBRID_MARKERS = frozenset({"x", HYBRID_SIGN})
WORD = re.compile(r"^[a-z][a-z-]*$")
SUBGENUS = re.compile(r"^\([A-Za-z]+\)$")


@dataclass(frozen=True)
class ParsedName:
    raw: str
    genus: str | None = None
    epithet: str | None = None
    infraspecific: str | None = None
    problem: str | None = None  # why this cannot name a species

    @property
    def species(self) -> str | None:
        return f"{self.genus} {self.epithet}" if self.genus and self.epithet else None


def parse_name(raw: str) -> ParsedName:
    text = " ".join(unicodedata.normalize("NFKC", raw or "").replace("_", " ").split())
    if not text:
        return ParsedName(raw, problem="empty name")
    tokens = text.split(" ")
    # The sign stands alone ("Mentha x piperita") or, as botanists usually write it, on
    # the epithet ("Mentha \u00d7piperita") or on the genus of an intergeneric hybrid.
    if tokens[0].startswith(HYBRID_SIGN) or any(
        t.lower() in HYBRID_MARKERS or t.startswith(HYBRID_SIGN) for t in tokens[1:3]
    ):
        return ParsedName(raw, problem="hybrid name")
    genus = tokens[0].capitalize()
    if not WORD.match(genus.lower()):
        return ParsedName(raw, problem="not a scientific name")
    rest = tokens[1:]
    if rest and SUBGENUS.match(rest[0]) and len(rest) > 1:
        rest = rest[1:]
    if rest and rest[0].lower() in QUALIFIERS:
        return ParsedName(raw, genus=genus, problem="uncertain identification (cf./aff.)")
    if not rest or rest[0].lower() in UNSPECIFIED or not WORD.match(rest[0].lower()):
        return ParsedName(raw, genus=genus, problem="not identified to species")
    epithet = rest[0].lower()
    return ParsedName(raw, genus, epithet, _infraspecific(rest[1:], text.isupper()))


def _infraspecific(tokens: list[str], all_caps: bool) -> str | None:
    if not tokens:
        return None
    first = tokens[0].lower() if all_caps else tokens[0]
    if first.lower() in RANK_MARKERS:
        return tokens[1].lower() if len(tokens) > 1 and WORD.match(tokens[1].lower()) else None
    if WORD.match(first) and first not in AUTHOR_PARTICLES:
        return first
    return None
