"""Species-name resolution: embedpipe against a per-row Python dict lookup loop.

Builds a 200,000-row GBIF-format taxon table (accepted species, synonyms,
genera and higher ranks) and 1,000,000 image rows whose names are written the
way collectors write them (author strings, odd case, synonyms, unknowns). Each
run happens in a fresh process, after the table is loaded and indexed (a cost
both approaches share, printed separately):

- baseline: for every row, normalise the name and look it up in a dict from
  canonical name to accepted taxon id;
- embedpipe: ``resolve_names`` (dictionary-encode the column, resolve each
  distinct spelling once with the full synonym/homonym rules, map back).

Usage: python benchmarks/taxonomy.py [--rows 1000000] [--taxa 200000]
"""

import argparse
import random
import time
from pathlib import Path

import harness
import pyarrow as pa
import pyarrow.parquet as pq

from embedpipe.taxonomy.names import parse_name
from embedpipe.taxonomy.resolve import SpeciesResolver
from embedpipe.taxonomy.stage import resolve_names
from embedpipe.taxonomy.table import load_taxon_table
from embedpipe.taxonomy.tree import Lineages

HEADER = (
    "taxonID\tscientificName\tcanonicalName\ttaxonRank\ttaxonomicStatus\t"
    "acceptedNameUsageID\tparentNameUsageID\tkingdom\tfamily\tgenus"
)
SYLLABLES = ["ba", "ce", "di", "fo", "gu", "la", "me", "ni", "po", "ru", "sa", "te", "vi", "zo"]


def word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts))


def generate(work: Path, taxa: int, rows: int) -> tuple[Path, Path]:
    table, names = work / f"taxa-{taxa}.tsv", work / f"names-{rows}.parquet"
    if table.exists() and names.exists():
        return table, names
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = [HEADER, "1\tAnimalia\tAnimalia\tkingdom\taccepted\t\t\tAnimalia\t\t"]
    families = [f"{word(rng, 3).capitalize()}idae" for _ in range(200)]
    for f, family in enumerate(families):
        lines.append(f"f{f}\t{family}\t{family}\tfamily\taccepted\t\t1\tAnimalia\t\t")
    species, taxon_id = [], 0
    while len(lines) < taxa:
        f = rng.randrange(len(families))
        genus = word(rng, 3).capitalize() + "a" * (taxon_id % 3)
        gid = f"g{taxon_id}"
        lines.append(f"{gid}\t{genus}\t{genus}\tgenus\taccepted\t\tf{f}\tAnimalia\t{families[f]}\t")
        for _ in range(rng.randint(5, 25)):
            taxon_id += 1
            name = f"{genus} {word(rng, 4)}"
            lines.append(
                f"s{taxon_id}\t{name} (Auth, 1900)\t{name}\tspecies\taccepted\t\t{gid}"
                f"\tAnimalia\t{families[f]}\t{genus}"
            )
            species.append(name)
            if rng.random() < 0.25:
                synonym = f"{word(rng, 3).capitalize()} {name.split()[1]}"
                lines.append(
                    f"y{taxon_id}\t{synonym}\t{synonym}\tspecies\tsynonym\ts{taxon_id}"
                    f"\t{gid}\tAnimalia\t{families[f]}\t{genus}"
                )
                species.append(synonym)
        taxon_id += 1
    table.write_text("\n".join(lines[:taxa]) + "\n")

    observed = rng.sample(species[: len(species) * 9 // 10], 40_000)
    spellings = []
    for name in observed:
        style = rng.random()
        if style < 0.3:
            name = f"{name} (Linnaeus, 1758)"
        elif style < 0.4:
            name = name.lower().replace(" ", "_")
        spellings.append(name)
    spellings += [f"Nonexistens {word(rng, 4)}" for _ in range(2_000)] + ["Genus sp."]
    column = [spellings[int(rng.paretovariate(1.2)) % len(spellings)] for _ in range(rows)]
    pq.write_table(pa.table({"name": column}), names)
    return table, names


def load(table: str):
    started = time.perf_counter()
    taxa = load_taxon_table(table)
    resolver = SpeciesResolver(taxa, Lineages(taxa))
    return taxa, resolver, time.perf_counter() - started


def embedpipe_run(table: str, names: str) -> int:
    _, resolver, _ = load(table)
    column = pq.read_table(names).column("name")
    started = time.perf_counter()
    resolved = resolve_names(column, resolver)
    accepted = resolved.accepted_row_of_image()
    print(f"resolve_seconds={time.perf_counter() - started}", flush=True)
    return len(accepted)


def baseline_run(table: str, names: str) -> int:
    taxa, _, _ = load(table)
    accepted_id = {}
    for row, name in enumerate(taxa.canonical):
        if taxa.rank[row] == "species":
            target = row if taxa.is_accepted(row) else taxa.accepted[row]
            accepted_id[parse_name(name).species] = taxa.ids[target]
    column = pq.read_table(names).column("name").to_pylist()
    started = time.perf_counter()
    labels = []
    for name in column:
        labels.append(accepted_id.get(parse_name(name).species))
    print(f"resolve_seconds={time.perf_counter() - started}", flush=True)
    return len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--taxa", type=int, default=200_000)
    parser.add_argument("--workdir", default=".bench/taxonomy")
    parser.add_argument("--measure", nargs=3, metavar=("MODE", "TABLE", "NAMES"))
    args = parser.parse_args()
    if args.measure:
        mode, table, names = args.measure
        run = embedpipe_run if mode == "embedpipe" else baseline_run
        harness.report(lambda: run(table, names))
        return
    table, names = generate(Path(args.workdir), args.taxa, args.rows)
    _, _, load_seconds = load(str(table))
    print(f"table: {args.taxa} rows, loaded, checked and indexed in {load_seconds:.2f} s")
    results = {
        mode: harness.measure(__file__, mode, table, names) for mode in ("baseline", "embedpipe")
    }
    print(f"\n{'run':36s} {'rows':>9s} {'rows/s':>12s} {'peak MiB':>9s} {'x baseline':>10s}")
    base = None
    for mode, figures in results.items():
        rate = figures["items"] / figures["resolve_seconds"]
        base = base or rate
        label = {
            "baseline": "baseline (per-row dict lookup loop)",
            "embedpipe": "embedpipe resolve_names",
        }[mode]
        print(
            f"{label:36s} {figures['items']:9d} {rate:12,.0f} {figures['peak_mb']:9.0f} "
            f"{rate / base:10.1f}"
        )


if __name__ == "__main__":
    main()
