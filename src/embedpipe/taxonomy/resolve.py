"""Resolve parsed names against the taxon table to accepted species.

A name matches species-rank rows whose canonical name parses to the same
``Genus epithet``. Each match is followed through acceptedNameUsageID to its
accepted species, so synonyms land on the accepted taxon. When the spelling
is the accepted name of one taxon and a synonym of another, the accepted
name wins. Several accepted species left over are an ambiguous homonym (the
reason says whether they span kingdoms); ``kingdom`` narrows the candidates.
"""

import collections
from dataclasses import dataclass

from embedpipe.taxonomy.names import ParsedName
from embedpipe.taxonomy.table import NO_ROW, TaxonTable
from embedpipe.taxonomy.tree import Lineages

SPECIES_RANK = "species"


@dataclass(frozen=True)
class Resolution:
    row: int  # accepted species row, or NO_ROW
    reason: str | None = None  # why it is unknown
    matched_status: str | None = None  # status of the matched usage (accepted, synonym, ...)

    @property
    def known(self) -> bool:
        return self.row != NO_ROW


class SpeciesResolver:
    def __init__(self, taxa: TaxonTable, lineages: Lineages, kingdom: str | None = None) -> None:
        from embedpipe.taxonomy.names import parse_name

        self.taxa = taxa
        self.lineages = lineages
        self.kingdom = kingdom or None
        self.rows_by_name: dict[str, list[int]] = collections.defaultdict(list)
        for row, rank in enumerate(taxa.rank):
            if rank == SPECIES_RANK:
                name = parse_name(taxa.canonical[row]).species
                if name:
                    self.rows_by_name[name].append(row)

    def accepted_row(self, row: int) -> int:
        while not self.taxa.is_accepted(row):
            target = self.taxa.accepted[row]
            if target in (NO_ROW, row):
                return NO_ROW
            row = target
        return row

    def resolve(self, parsed: ParsedName) -> Resolution:
        if parsed.problem:
            return Resolution(NO_ROW, parsed.problem)
        matches = self.rows_by_name.get(parsed.species, [])
        if not matches:
            return Resolution(NO_ROW, "no match in the taxonomy table")
        targets: dict[int, list[int]] = collections.defaultdict(list)
        for row in matches:
            accepted = self.accepted_row(row)
            if accepted != NO_ROW and self.taxa.rank[accepted] == SPECIES_RANK:
                targets[accepted].append(row)
        if not targets:
            return Resolution(NO_ROW, "matches only synonyms without an accepted species")
        if self.kingdom:
            targets = {a: m for a, m in targets.items() if self._kingdom(a) == self.kingdom}
            if not targets:
                return Resolution(NO_ROW, f"no match in kingdom {self.kingdom}")
        if len(targets) > 1:
            direct = [accepted for accepted, rows in targets.items() if accepted in rows]
            if len(direct) != 1:
                return Resolution(NO_ROW, self._ambiguity(targets))
            targets = {direct[0]: targets[direct[0]]}
        [(accepted, rows)] = targets.items()
        status = "accepted" if accepted in rows else self.taxa.status[rows[0]]
        return Resolution(accepted, None, status)

    def _kingdom(self, row: int) -> str | None:
        return self.lineages.of(row)["kingdom"]

    def _ambiguity(self, targets: dict[int, list[int]]) -> str:
        ids = ", ".join(sorted(self.taxa.ids[a] for a in targets))
        kingdoms = sorted({self._kingdom(a) or "?" for a in targets})
        if len(kingdoms) > 1:
            return (
                f"ambiguous homonym across kingdoms {', '.join(kingdoms)} (taxa {ids}); "
                "set [taxonomy].kingdom to choose"
            )
        return f"ambiguous: {len(targets)} accepted species share this name (taxa {ids})"
