"""One command per library stage: its inputs as arguments, its options from its settings."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from embedpipe.cli.flags import add_settings_flags, settings_from_args
from embedpipe.config import STAGE_SETTINGS, ConfigError, Settings


def _print_result(result: Any) -> None:
    print(json.dumps(asdict(result), indent=2, sort_keys=True))


def _out(parser: argparse.ArgumentParser, help: str = "output dataset folder") -> None:
    parser.add_argument("--out", required=True, metavar="URI", help=help)


def _images_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", metavar="IMAGES", help="dataset written by `ingest`")


def run_ingest(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.data.ingest import ingest_images

    _print_result(ingest_images(args.sources, args.out, settings.ingest))


def inputs_ingest(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="folder, .tar/.tar.gz archive or s3://bucket/prefix",
    )
    _out(parser)


def run_catalog(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.data.catalog import build_catalog

    _print_result(build_catalog(args.images, args.out, settings.catalog))


def inputs_catalog(parser: argparse.ArgumentParser) -> None:
    _images_input(parser)
    _out(parser, "output catalog folder")


def run_split(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.data.split import create_concept_splits

    _print_result(create_concept_splits(args.catalog, args.out, settings.split))


def inputs_split(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("catalog", metavar="CATALOG", help="dataset written by `catalog`")
    _out(parser, "output splits folder")


def run_taxonomy(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.taxonomy.stage import build_taxonomy

    config = settings.taxonomy
    if not config.table:
        raise ConfigError("taxonomy: give --table or set [taxonomy].table")
    _print_result(build_taxonomy(args.images, config.table, args.out, config))


def inputs_taxonomy(parser: argparse.ArgumentParser) -> None:
    _images_input(parser)
    _out(parser, "output folder")


def run_dedup(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.data.dedup import find_duplicates

    _print_result(find_duplicates(args.images, args.out, settings.dedup, args.splits, args.kept))


def inputs_dedup(parser: argparse.ArgumentParser) -> None:
    _images_input(parser)
    parser.add_argument(
        "--splits",
        metavar="URI",
        help="dataset written by `split` or `catalog` (splits for the leakage report)",
    )
    _out(parser, "output folder")
    parser.add_argument("--kept", metavar="URI", help="write the kept selection here (OUT/kept)")


def run_embed(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.embed.images import embed_images
    from embedpipe.models.registry import get_entry

    entry = get_entry(settings.embed.model, settings.models)
    _print_result(embed_images(args.images, args.out, settings.embed, entry, args.select))


def inputs_embed(parser: argparse.ArgumentParser) -> None:
    _images_input(parser)
    parser.add_argument(
        "--select",
        metavar="URI",
        help="embed only the image ids of this dataset (e.g. dedup's kept)",
    )
    _out(parser)


def run_embed_text(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.embed.texts import embed_texts
    from embedpipe.models.registry import get_entry

    entry = get_entry(settings.embed.model, settings.models)
    _print_result(embed_texts(args.texts, args.out, settings.embed, entry, args.column))


def inputs_embed_text(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "texts", metavar="TEXTS", help=".txt (one per line), .parquet file or dataset folder"
    )
    parser.add_argument("--column", default="text", help="text column in Parquet (text)")
    _out(parser)


def run_mine(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.core import storage
    from embedpipe.mining.mine import mine_category
    from embedpipe.mining.partition import split_by_category

    partitions = split_by_category(args.metadata, args.embeddings)
    unknown = sorted(set(args.category or []) - set(partitions))
    if unknown:
        raise ValueError(f"{args.metadata}: no category {', '.join(unknown)}")
    results = [
        mine_category(
            partitions[category], storage.join(args.out, "negatives", category), settings.mine
        )
        for category in args.category or sorted(partitions)
    ]
    print(json.dumps([asdict(r) for r in results], indent=2, sort_keys=True))


def inputs_mine(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "metadata",
        metavar="METADATA",
        help="image ids with category/concept/split (dedup kept, or split output)",
    )
    parser.add_argument("embeddings", metavar="EMBEDDINGS", help="dataset written by `embed`")
    parser.add_argument(
        "--category", action="append", help="category to mine (repeatable; default: all)"
    )
    _out(parser, "output folder: OUT/negatives/<category> for each category")


def run_combine(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.mining.combine import combine_negatives

    _print_result(combine_negatives(args.inputs, args.out, settings.combine))


def inputs_combine(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="NEGATIVES", help="`mine` outputs")
    _out(parser)


def run_to_hf(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.mining.to_hf import export_to_hf

    rows = export_to_hf(args.negatives, args.images, args.out, settings.to_hf)
    print(json.dumps({"out_uri": args.out, "rows": rows}))


def inputs_to_hf(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("negatives", metavar="NEGATIVES", help="`combine` (or `mine`) output")
    _images_input(parser)
    _out(parser, "save_to_disk folder or s3://")


@dataclass(frozen=True)
class StageCommand:
    name: str  # the command
    stage: str  # the [section] of its settings
    inputs: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Settings], None]
    help: str
    description: str = ""


STAGE_COMMANDS = (
    StageCommand(
        "ingest",
        "ingest",
        inputs_ingest,
        run_ingest,
        "images (folders, tar archives, s3:// prefixes) -> Parquet image shards",
        "Read images laid out <category>/<concept>/<image> or "
        "<split>/<category>/<concept>/<image> and write Parquet shards. Unreadable "
        "images are listed in OUT/.embedpipe/rejected.parquet and skipped.",
    ),
    StageCommand(
        "catalog",
        "catalog",
        inputs_catalog,
        run_catalog,
        "image shards -> train/test catalog (Parquet + PerVA JSON)",
        "Keep explicit train/test folders, or split each concept with "
        "--num-train (exact) or --train-fraction, seeded.",
    ),
    StageCommand(
        "split",
        "split",
        inputs_split,
        run_split,
        "catalog -> concept-level train/val splits",
        "Hold out whole concepts for validation, per category, seeded.",
    ),
    StageCommand(
        "taxonomy",
        "taxonomy",
        inputs_taxonomy,
        run_taxonomy,
        "species names -> accepted taxa, rank keys, taxon splits, captions",
        "Resolve each image's species name against a GBIF/Darwin Core taxon "
        "table (synonyms to accepted names) and write species ids, the taxonomic tree, "
        "integer keys per rank, taxon-aware splits and per-split indexes with captions.",
    ),
    StageCommand(
        "dedup",
        "dedup",
        inputs_dedup,
        run_dedup,
        "perceptual-hash duplicates, cross-split leakage report, optional drop",
        "Group exact (same content hash) and near (perceptual hash within "
        "--max-distance bits) duplicates, report groups that span splits per category, "
        "write an HTML report and the kept selection.",
    ),
    StageCommand(
        "embed",
        "embed",
        inputs_embed,
        run_embed,
        "image shards -> Parquet embeddings with a registered model",
        "Batched inference in DataLoader workers; resumes after the last "
        "finished shard when run again with the same settings.",
    ),
    StageCommand(
        "embed-text",
        "embed",
        inputs_embed_text,
        run_embed_text,
        "texts (captions, class prompts) -> Parquet embeddings with an image-text model",
    ),
    StageCommand(
        "mine",
        "mine",
        inputs_mine,
        run_mine,
        "per-category hard negatives with a faiss kNN index, difficulty bands",
        "For each query image, its nearest images of other concepts in the same "
        "category (candidates from --candidate-splits only, so held-out images never become "
        "training negatives), its positives, and a difficulty band per negative.",
    ),
    StageCommand(
        "combine", "combine", inputs_combine, run_combine, "per-category negatives -> one dataset"
    ),
    StageCommand(
        "to-hf", "to_hf", inputs_to_hf, run_to_hf, "negatives + images -> Hugging Face Dataset"
    ),
)


def add_stage_commands(commands: argparse._SubParsersAction) -> None:
    for command in STAGE_COMMANDS:
        parser = commands.add_parser(
            command.name, help=command.help, description=command.description or command.help
        )
        command.inputs(parser)
        add_settings_flags(parser, command.stage, STAGE_SETTINGS[command.stage])
        parser.set_defaults(handler=_handler(command))


def _handler(command: StageCommand) -> Callable[[argparse.Namespace], None]:
    def handle(args: argparse.Namespace) -> None:
        command.run(args, settings_from_args(args))

    return handle
