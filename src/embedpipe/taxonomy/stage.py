"""taxonomy: ingested images + a taxon table -> species ids, tree, rank keys, splits, indexes.

Output folder (a bundle: each subfolder is a dataset of its own):

- ``species/``: one row per distinct name in the data (all), with status known
  or unknown, the reason, and the accepted taxon;
- ``tree/``: the kingdom -> species path of every known species;
- ``rank_keys/``: the integer key of every lineage per rank;
- ``index/<split>/``: per split, each image's species, key at every rank and caption;
- ``.embedpipe/``: ``known_species.json`` and ``unknown_species.json`` (the
  species lists for people), ``rank_keys.json``, ``taxon_split_metadata.json``,
  ``config.json``, and ``manifest.json`` last.

Names are resolved once per distinct spelling, not once per image, and mapped
back to the images with Arrow ``take``: a million rows cost what their few
thousand names cost.
"""

import collections
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from embedpipe.config import TaxonomySettings
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import (
    IMAGES_KIND,
    TAXONOMY_INDEX_KIND,
    TAXONOMY_INDEX_SCHEMA,
    TAXONOMY_KIND,
    TAXONOMY_RANK_KEYS_KIND,
    TAXONOMY_RANK_KEYS_SCHEMA,
    TAXONOMY_SPECIES_KIND,
    TAXONOMY_SPECIES_SCHEMA,
    TAXONOMY_TREE_KIND,
    TAXONOMY_TREE_SCHEMA,
)
from embedpipe.taxonomy import RANKS
from embedpipe.taxonomy.labels import caption, key_of, lineage, rank_keys, taxonomic_name
from embedpipe.taxonomy.names import ParsedName, parse_name
from embedpipe.taxonomy.resolve import Resolution, SpeciesResolver
from embedpipe.taxonomy.split import SPLITS, SpeciesImages, split_species
from embedpipe.taxonomy.table import NO_ROW, TaxonTable, load_taxon_table
from embedpipe.taxonomy.tree import Lineages

log = logging.getLogger(__name__)

NAME = "name"
ROW_ORDER = "__row"
SPLIT_METADATA_JSON = "taxon_split_metadata.json"
KNOWN_JSON = "known_species.json"
UNKNOWN_JSON = "unknown_species.json"
RANK_KEYS_JSON = "rank_keys.json"


class TaxonomyInputError(ValueError):
    """The images or the side table cannot provide species names."""


@dataclass(frozen=True)
class TaxonomyResult(StageMetrics):
    out_uri: str
    names: int
    known_names: int
    unknown_names: int
    species: int
    labelled_images: int
    unlabelled_images: int
    train_images: int
    val_images: int
    test_images: int


@dataclass(frozen=True)
class ResolvedNames:
    """Distinct spellings, their parses and resolutions, and each image's spelling."""

    spellings: list[str]
    parsed: list[ParsedName]
    resolutions: list[Resolution]
    spelling_of_image: np.ndarray

    def accepted_row_of_image(self) -> np.ndarray:
        rows = np.array([r.row for r in self.resolutions], dtype=np.int64)
        return rows[self.spelling_of_image] if len(rows) else rows


def resolve_names(names: pa.ChunkedArray | pa.Array, resolver: SpeciesResolver) -> ResolvedNames:
    encoded = pc.dictionary_encode(
        names.combine_chunks() if hasattr(names, "combine_chunks") else names
    )
    spellings = encoded.dictionary.to_pylist()
    parsed = [parse_name(spelling) for spelling in spellings]
    resolutions = [resolver.resolve(name) for name in parsed]
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    return ResolvedNames(spellings, parsed, resolutions, indices)


def read_side_table(uri: str) -> pa.Table:
    fs, path = storage.arrow_filesystem(uri)
    if uri.lower().endswith(".parquet"):
        return pq.read_table(path, filesystem=fs)
    with fs.open_input_stream(path) as stream:
        return pacsv.read_csv(stream)


def read_names(images_uri: str, config: TaxonomySettings) -> pa.Table:
    """image_id, source and the species name of every ingested image, in dataset order."""
    if not config.side_table:
        images = datasets.read_table(images_uri, IMAGES_KIND)
        if config.name_column not in images.column_names:
            raise TaxonomyInputError(
                f"{images_uri}: no column '{config.name_column}' "
                f"(columns: {', '.join(images.column_names)})"
            )
        images = images.select(["image_id", "source", config.name_column])
        return images.rename_columns(["image_id", "source", NAME])
    images = datasets.read_table(images_uri, IMAGES_KIND, columns=["image_id", "source"])
    side = read_side_table(config.side_table)
    key, column = config.side_table_key, config.name_column
    missing = [c for c in (key, column) if c not in side.column_names]
    if missing:
        raise TaxonomyInputError(
            f"{config.side_table}: missing column(s) {', '.join(missing)} "
            f"(columns: {', '.join(side.column_names)})"
        )
    side = side.select([key, column]).cast(pa.schema([(key, pa.string()), (column, pa.string())]))
    counts = pc.value_counts(side.column(key))
    repeated = [c["values"] for c in counts.to_pylist() if c["counts"] > 1]
    if repeated:
        raise TaxonomyInputError(
            f"{config.side_table}: {len(repeated)} {key} value(s) appear "
            f"more than once, e.g. {', '.join(map(str, repeated[:3]))}"
        )
    images = images.append_column(ROW_ORDER, pa.array(np.arange(images.num_rows)))
    joined = images.join(side.rename_columns([key, NAME]), keys=key, join_type="left outer")
    joined = joined.sort_by(ROW_ORDER).drop_columns([ROW_ORDER])
    return joined.select(["image_id", "source", NAME])


@outputs.writes_output(inputs=("images_uri", "table_uri"))
def build_taxonomy(
    images_uri: str, table_uri: str, out_uri: str, config: TaxonomySettings
) -> TaxonomyResult:
    """Resolve every image's species name and write labels, splits and indexes."""
    out_uri = storage.normalize(out_uri)
    datasets.verify_dataset(images_uri, IMAGES_KIND)
    taxa = load_taxon_table(table_uri)
    lineages = Lineages(taxa)
    resolver = SpeciesResolver(taxa, lineages, config.kingdom)
    images = read_names(images_uri, config)
    names = pc.fill_null(images.column(NAME), "")
    resolved = resolve_names(names, resolver)
    accepted = resolved.accepted_row_of_image()
    per_spelling = np.bincount(resolved.spelling_of_image, minlength=len(resolved.spellings))

    known_rows = sorted(
        {r.row for r in resolved.resolutions if r.known}, key=lambda row: taxa.ids[row]
    )
    paths = {row: lineages.of(row) for row in known_rows}
    keys = rank_keys(list(paths.values()))
    images_per_species = collections.Counter(accepted[accepted != NO_ROW].tolist())

    _write_species(out_uri, taxa, resolved, per_spelling)
    _write_tree(out_uri, taxa, paths, images_per_species)
    _write_rank_keys(out_uri, keys)

    sources = images.column("source").to_pylist()
    image_rows: dict[int, list[int]] = collections.defaultdict(list)
    for image_row in np.flatnonzero(accepted != NO_ROW).tolist():
        image_rows[int(accepted[image_row])].append(image_row)
    species = [
        SpeciesImages(
            taxa.ids[row],
            lineage(paths[row], "genus") or taxa.ids[row],
            sorted(image_rows[row], key=lambda i: (sources[i], i)),
        )
        for row in known_rows
    ]
    assignment, split_metadata = split_species(species, config)
    counts = _write_indexes(out_uri, taxa, images, accepted, assignment, paths, keys)
    storage.write_json(datasets.side_path(out_uri, SPLIT_METADATA_JSON), split_metadata)
    datasets.save_config(out_uri, "taxonomy", config)

    known_names = sum(r.known for r in resolved.resolutions)
    result = TaxonomyResult(
        out_uri=out_uri,
        names=len(resolved.spellings),
        known_names=known_names,
        unknown_names=len(resolved.spellings) - known_names,
        species=len(known_rows),
        labelled_images=int((accepted != NO_ROW).sum()),
        unlabelled_images=int((accepted == NO_ROW).sum()),
        train_images=counts["train"],
        val_images=counts["val"],
        test_images=counts["test"],
    )
    datasets.finish_bundle(
        out_uri,
        TAXONOMY_KIND,
        ["species", "tree", "rank_keys", *(f"index/{s}" for s in SPLITS)],
        {"table": table_uri, "metrics": result.metrics()},
    )
    log.info("taxonomy: %s", result.metrics())
    if result.unknown_names:
        log.warning(
            "%d name(s) not resolved; reasons in %s",
            result.unknown_names,
            datasets.side_path(out_uri, UNKNOWN_JSON),
        )
    return result


def _write_species(
    out_uri: str, taxa: TaxonTable, resolved: ResolvedNames, per_spelling: np.ndarray
) -> None:
    rows = []
    for spelling, parsed, resolution, n_images in zip(
        resolved.spellings,
        resolved.parsed,
        resolved.resolutions,
        per_spelling.tolist(),
        strict=True,
    ):
        accepted = resolution.row
        rows.append(
            {
                "raw_name": spelling,
                "name": parsed.species,
                "infraspecific": parsed.infraspecific,
                "status": "known" if resolution.known else "unknown",
                "reason": resolution.reason,
                "taxon_id": taxa.ids[accepted] if resolution.known else None,
                "accepted_name": taxa.canonical[accepted] if resolution.known else None,
                "matched_status": resolution.matched_status,
                "images": n_images,
            }
        )
    rows.sort(key=lambda row: row["raw_name"])
    datasets.write_table(
        storage.join(out_uri, "species"),
        pa.Table.from_pylist(rows, TAXONOMY_SPECIES_SCHEMA),
        TAXONOMY_SPECIES_KIND,
    )
    known = {
        r["raw_name"]: {k: r[k] for k in ("taxon_id", "accepted_name", "matched_status")}
        for r in rows
        if r["status"] == "known"
    }
    unknown = {r["raw_name"]: r["reason"] for r in rows if r["status"] == "unknown"}
    storage.write_json(datasets.side_path(out_uri, KNOWN_JSON), known)
    storage.write_json(datasets.side_path(out_uri, UNKNOWN_JSON), unknown)


def _write_tree(out_uri: str, taxa: TaxonTable, paths: dict, images_per_species) -> None:
    columns: dict[str, list] = {
        "taxon_id": [],
        **{rank: [] for rank in RANKS},
        "vernacular_name": [],
        "images": [],
    }
    for row, path in paths.items():
        columns["taxon_id"].append(taxa.ids[row])
        for rank in RANKS:
            columns[rank].append(path.get(rank))
        columns["vernacular_name"].append(_common_name(taxa, row))
        columns["images"].append(images_per_species[row])
    datasets.write_table(
        storage.join(out_uri, "tree"),
        pa.table(columns, schema=TAXONOMY_TREE_SCHEMA),
        TAXONOMY_TREE_KIND,
    )


def _write_rank_keys(out_uri: str, keys: dict[str, dict[str, int]]) -> None:
    rows = [
        {"rank": rank, "lineage": value, "name": value.rsplit("|", 1)[-1], "key": key}
        for rank in RANKS
        for value, key in keys[rank].items()
    ]
    datasets.write_table(
        storage.join(out_uri, "rank_keys"),
        pa.Table.from_pylist(rows, TAXONOMY_RANK_KEYS_SCHEMA),
        TAXONOMY_RANK_KEYS_KIND,
    )
    storage.write_json(datasets.side_path(out_uri, RANK_KEYS_JSON), keys)


def _common_name(taxa: TaxonTable, row: int) -> str | None:
    if taxa.vernacular is None:
        return None
    return taxa.vernacular[row].strip() or None


def _write_indexes(out_uri, taxa, images, accepted, assignment, paths, keys) -> collections.Counter:
    image_ids = images.column("image_id").to_pylist()
    sources = images.column("source").to_pylist()
    per_split: dict[str, dict[str, list]] = {}
    for image_row, split in sorted(assignment.items()):
        row = int(accepted[image_row])
        path = paths[row]
        columns = per_split.setdefault(split, collections.defaultdict(list))
        columns["image_id"].append(image_ids[image_row])
        columns["source"].append(sources[image_row])
        columns["species_id"].append(taxa.ids[row])
        for rank in RANKS:
            columns[f"{rank}_key"].append(key_of(keys, path, rank))
        common = _common_name(taxa, row)
        columns["taxonomic_name"].append(taxonomic_name(path))
        columns["common_name"].append(common)
        columns["caption"].append(caption(path, common))
    counts = collections.Counter()
    for split in SPLITS:
        columns = per_split.get(split, {name: [] for name in TAXONOMY_INDEX_SCHEMA.names})
        names = TAXONOMY_INDEX_SCHEMA.names
        table = pa.table({name: columns[name] for name in names}, schema=TAXONOMY_INDEX_SCHEMA)
        datasets.write_table(
            storage.join(out_uri, "index", split),
            table,
            TAXONOMY_INDEX_KIND,
            extra={"split": split},
        )
        counts[split] = table.num_rows
    return counts
