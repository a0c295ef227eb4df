"""Load and check a taxon table in the GBIF backbone / Darwin Core Taxon layout.

Tab-separated, one taxon per row. Required columns: taxonID, scientificName,
taxonRank, taxonomicStatus, acceptedNameUsageID, parentNameUsageID. Used when
present: canonicalName (else derived from scientificName), kingdom, phylum,
class, order, family, genus (fill ranks the parent chain lacks) and
vernacularName (common names in captions). Duplicate taxon ids and cycles in
parent or accepted links are errors that name the rows.
"""

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv

from embedpipe.core import storage
from embedpipe.taxonomy import RANKS
from embedpipe.taxonomy.names import parse_name

REQUIRED_COLUMNS = (
    "taxonID",
    "scientificName",
    "taxonRank",
    "taxonomicStatus",
    "acceptedNameUsageID",
    "parentNameUsageID",
)
OPTIONAL_COLUMNS = ("canonicalName", "vernacularName", *RANKS[:-1])
ACCEPTED_STATUSES = frozenset({"accepted", "valid", "doubtful"})
MAX_NAMED_ROWS = 10
NO_ROW = -1


class TaxonomyTableError(ValueError):
    """The taxon table is malformed; the message names the rows."""


@dataclass
class TaxonTable:
    uri: str
    ids: list[str]
    canonical: list[str]
    rank: list[str]
    status: list[str]
    parent: list[int]
    accepted: list[int]
    rank_columns: dict[str, list[str]]
    vernacular: list[str] | None
    row_of: dict[str, int] = field(repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def line(self, row: int) -> int:
        """1-based line number in the file (line 1 is the header)."""
        return row + 2

    def is_accepted(self, row: int) -> bool:
        return self.status[row] in ACCEPTED_STATUSES


def _read_tsv(uri: str) -> pa.Table:
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_stream(path) as stream:
        header = stream.read(1 << 16).split(b"\n", 1)[0].decode("utf-8").rstrip("\r")
    present = header.split("\t")
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise TaxonomyTableError(
            f"{uri}: missing required column(s) {', '.join(missing)}; found {', '.join(present)}"
        )
    wanted = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in present]
    with fs.open_input_stream(path) as stream:
        return pacsv.read_csv(
            stream,
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                include_columns=wanted,
                column_types={c: pa.string() for c in wanted},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )


def load_taxon_table(uri: str) -> TaxonTable:
    table = _read_tsv(uri)
    column = {name: table.column(name).to_pylist() for name in table.column_names}
    ids = [value.strip() for value in column["taxonID"]]
    row_of: dict[str, int] = {}
    duplicates: dict[str, list[int]] = {}
    for row, taxon_id in enumerate(ids):
        if taxon_id in row_of:
            duplicates.setdefault(taxon_id, [row_of[taxon_id]]).append(row)
        else:
            row_of[taxon_id] = row
    if duplicates:
        named = "; ".join(
            f"taxonID {tid} on lines {', '.join(str(r + 2) for r in rows)}"
            for tid, rows in list(duplicates.items())[:MAX_NAMED_ROWS]
        )
        raise TaxonomyTableError(f"{uri}: duplicate taxon ids: {named}")

    def rows_of(name: str) -> list[int]:
        return [
            row_of.get(value.strip(), NO_ROW) if value.strip() else NO_ROW for value in column[name]
        ]

    canonical = column.get("canonicalName") or [""] * len(ids)
    canonical = [
        c.strip() or (parse_name(s).species or s.strip())
        for c, s in zip(canonical, column["scientificName"], strict=True)
    ]
    taxa = TaxonTable(
        uri=uri,
        ids=ids,
        canonical=canonical,
        rank=[value.strip().lower() for value in column["taxonRank"]],
        status=[value.strip().lower() for value in column["taxonomicStatus"]],
        parent=rows_of("parentNameUsageID"),
        accepted=rows_of("acceptedNameUsageID"),
        rank_columns={rank: column[rank] for rank in RANKS[:-1] if rank in column},
        vernacular=column.get("vernacularName"),
        row_of=row_of,
    )
    for links, what in ((taxa.parent, "parentNameUsageID"), (taxa.accepted, "acceptedNameUsageID")):
        cycle = find_cycle(links)
        if cycle:
            named = ", ".join(
                f"{taxa.ids[r]} (line {taxa.line(r)})" for r in cycle[:MAX_NAMED_ROWS]
            )
            raise TaxonomyTableError(f"{uri}: cycle in {what} links through taxa {named}")
    return taxa


def find_cycle(links: list[int]) -> list[int]:
    """Rows of one cycle in a row -> row link array (NO_ROW ends a chain), or []."""
    state = [0] * len(links)  # 0 unseen, 1 on the current walk, 2 known to end
    for start in range(len(links)):
        walk = []
        row = start
        while row != NO_ROW and state[row] == 0:
            state[row] = 1
            walk.append(row)
            row = links[row]
            if row == walk[-1]:
                # A taxon that names itself as its own accepted usage is a GBIF idiom, not a loop.
                row = NO_ROW
        if row != NO_ROW and state[row] == 1:
            return walk[walk.index(row) :]
        for visited in walk:
            state[visited] = 2
    return []
