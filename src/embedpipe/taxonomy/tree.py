"""The path from kingdom to species of an accepted taxon, from parent links.

Parent links are authoritative; ranks the chain lacks are filled from the
row's own kingdom..genus columns when the table has them, else left empty.
"""

from embedpipe.taxonomy import RANKS
from embedpipe.taxonomy.table import NO_ROW, TaxonTable

Path = dict[str, str | None]


class Lineages:
    def __init__(self, taxa: TaxonTable) -> None:
        self.taxa = taxa
        self._from_parents: dict[int, Path] = {}

    def _walk(self, row: int) -> Path:
        """Ranks named along the parent chain of ``row`` (itself included), memoised."""
        chain = []
        node = row
        while node != NO_ROW and node not in self._from_parents:
            chain.append(node)
            parent = self.taxa.parent[node]
            node = NO_ROW if parent == node else parent
        path = dict(self._from_parents[node]) if node != NO_ROW else dict.fromkeys(RANKS)
        for node in reversed(chain):
            rank = self.taxa.rank[node]
            path = dict(path)
            if rank in path:
                path[rank] = self.taxa.canonical[node]
            self._from_parents[node] = path
        return self._from_parents[row]

    def of(self, row: int) -> Path:
        path = dict(self._walk(row))
        for rank, values in self.taxa.rank_columns.items():
            if not path.get(rank) and values[row].strip():
                path[rank] = values[row].strip()
        return path
