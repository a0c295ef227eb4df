"""The ``embedpipe`` command: one subcommand per stage, plus run/compile for pipelines.

Every stage flag overrides the same key of the ``--config`` TOML file; a flag
left out keeps the file's value (or the default).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from embedpipe import __version__
from embedpipe.config import ConfigError, Settings, load_settings

log = logging.getLogger("embedpipe")


@dataclass(frozen=True)
class Flag:
    name: str  # --flag-name
    key: str  # section.key in the config file
    type: Callable[[str], Any] | None
    help: str


def _bool_flag(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


INGEST_FLAGS = (
    Flag("--rows-per-shard", "ingest.rows_per_shard", int, "images per Parquet shard"),
    Flag("--row-group-rows", "ingest.row_group_rows", int, "images per Parquet row group"),
    Flag("--workers", "ingest.workers", int, "decoding processes (0: one per core)"),
    Flag("--strip-components", "ingest.strip_components", int, "leading path parts to drop"),
)
CATALOG_FLAGS = (
    Flag("--num-train", "catalog.num_train", int, "exact train images per concept"),
    Flag("--train-fraction", "catalog.train_fraction", float, "train share per concept (0.2)"),
    Flag("--seed", "catalog.seed", int, "seed of the per-concept shuffles (42)"),
    Flag("--relative", "catalog.relative", None, "JSON paths relative to the source root"),
)
SPLIT_FLAGS = (
    Flag("--concept-frac", "split.concept_frac", float, "share of concepts for training (0.65)"),
    Flag(
        "--min-concepts-threshold",
        "split.min_concepts_threshold",
        int,
        "split only categories with at least this many concepts (3)",
    ),
    Flag(
        "--test-sample-frac",
        "split.test_sample_frac",
        float,
        "share of a training concept's test images moved to training (1.0)",
    ),
    Flag("--max-test-images", "split.max_test_images", int, "cap on those images (200)"),
    Flag("--seed", "split.seed", int, "seed of the concept selection (23)"),
)

TAXONOMY_FLAGS = (
    Flag("--table", "taxonomy.table", str, "GBIF/Darwin Core taxon TSV (path or s3://)"),
    Flag("--name-column", "taxonomy.name_column", str, "column with species names (concept)"),
    Flag("--side-table", "taxonomy.side_table", str, "Parquet/CSV holding the name column"),
    Flag("--side-table-key", "taxonomy.side_table_key", str, "join key: image_id or source"),
    Flag("--kingdom", "taxonomy.kingdom", str, "resolve names within this kingdom only"),
    Flag("--split-mode", "taxonomy.split_mode", str, "species (hold out species) or images"),
    Flag("--test-fraction", "taxonomy.test_fraction", float, "held-out share (0.2)"),
    Flag("--val-fraction", "taxonomy.val_fraction", float, "validation share (0.0)"),
    Flag("--min-images-per-species", "taxonomy.min_images_per_species", int, "(1)"),
    Flag(
        "--keep-genus-in-train",
        "taxonomy.keep_genus_in_train",
        _bool_flag,
        "true/false: a genus never loses all its species to held-out splits (true)",
    ),
    Flag("--seed", "taxonomy.seed", int, "seed of the taxon split (42)"),
)

DEDUP_FLAGS = (
    Flag("--hash", "dedup.hash", str, "phash, dhash, whash or colorhash (phash)"),
    Flag("--hash-size", "dedup.hash_size", int, "hash side: bits = size^2 (8)"),
    Flag("--max-distance", "dedup.max_distance", int, "Hamming bits for near duplicates (6)"),
    Flag("--workers", "dedup.workers", int, "hashing processes (0: one per core)"),
    Flag("--drop", "dedup.drop", str, "none, duplicates or leaking (none)"),
    Flag("--report-groups", "dedup.report_groups", int, "groups shown in the HTML report"),
)
EMBED_FLAGS = (
    Flag("--model", "embed.model", str, "registry name (see `embedpipe models`)"),
    Flag("--weights", "embed.weights", str, '"random", a local dir/file, s3:// or hub id'),
    Flag("--tokenizer-dir", "embed.tokenizer_dir", str, "local tokenizer (hub-tokenizer models)"),
    Flag("--batch-size", "embed.batch_size", int, "images per forward pass (64)"),
    Flag("--num-workers", "embed.num_workers", int, "DataLoader decoding processes (1)"),
    Flag("--device", "embed.device", str, "auto, cpu, cuda or cuda:N"),
    Flag("--precision", "embed.precision", str, "auto (bf16 on GPU), fp32, bf16 or fp16"),
    Flag("--normalize", "embed.normalize", _bool_flag, "true/false: L2-normalise (true)"),
    Flag("--draft-decode", "embed.draft_decode", _bool_flag, "true/false: JPEG draft decoding"),
)

MINE_FLAGS = (
    Flag("--top-k", "mine.top_k", int, "hard negatives per query (3)"),
    Flag(
        "--query-splits",
        "mine.query_splits",
        lambda v: tuple(v.split(",")),
        "comma-separated splits of the queries (train)",
    ),
    Flag(
        "--candidate-splits",
        "mine.candidate_splits",
        lambda v: tuple(v.split(",")),
        "comma-separated splits negatives come from (train)",
    ),
    Flag("--index", "mine.index", str, "auto, flat, ivf or hnsw (auto)"),
    Flag("--exact-max", "mine.exact_max", int, "auto: exact search up to this many candidates"),
    Flag("--gpu", "mine.gpu", _bool_flag, "true/false: faiss GPU when available (true)"),
)


def _add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config; flags override it")
    for flag in flags:
        dest = flag.key.replace(".", "__")
        if flag.type is None:
            parser.add_argument(
                flag.name, dest=dest, action="store_const", const=True, help=flag.help
            )
        else:
            parser.add_argument(flag.name, dest=dest, type=flag.type, help=flag.help)


def _settings(args: argparse.Namespace, flags: Sequence[Flag] = ()) -> Settings:
    overrides = {flag.key: getattr(args, flag.key.replace(".", "__")) for flag in flags}
    return load_settings(args.config, overrides)


def _print_result(result: Any) -> None:
    print(json.dumps(asdict(result), indent=2, sort_keys=True))


def cmd_ingest(args: argparse.Namespace) -> None:
    from embedpipe.data.ingest import ingest_images

    settings = _settings(args, INGEST_FLAGS)
    _print_result(ingest_images(args.sources, args.out, settings.ingest))


def cmd_catalog(args: argparse.Namespace) -> None:
    from embedpipe.data.catalog import build_catalog

    settings = _settings(args, CATALOG_FLAGS)
    _print_result(build_catalog(args.images, args.out, settings.catalog))


def cmd_split(args: argparse.Namespace) -> None:
    from embedpipe.data.split import create_concept_splits

    settings = _settings(args, SPLIT_FLAGS)
    _print_result(create_concept_splits(args.catalog, args.out, settings.split))


def cmd_taxonomy(args: argparse.Namespace) -> None:
    from embedpipe.taxonomy.stage import build_taxonomy

    settings = _settings(args, TAXONOMY_FLAGS)
    if not settings.taxonomy.table:
        raise ConfigError("taxonomy: give --table or set [taxonomy].table")
    config = settings.taxonomy
    _print_result(build_taxonomy(args.images, config.table, args.out, config))


def cmd_dedup(args: argparse.Namespace) -> None:
    from embedpipe.data.dedup import find_duplicates

    settings = _settings(args, DEDUP_FLAGS)
    result = find_duplicates(args.images, args.out, settings.dedup, args.splits, args.kept)
    _print_result(result)


def cmd_embed(args: argparse.Namespace) -> None:
    from embedpipe.embed.images import embed_images
    from embedpipe.models.registry import get_entry

    settings = _settings(args, EMBED_FLAGS)
    entry = get_entry(settings.embed.model, settings.models)
    _print_result(embed_images(args.images, args.out, settings.embed, entry, args.select))


def cmd_embed_text(args: argparse.Namespace) -> None:
    from embedpipe.embed.images import embed_texts
    from embedpipe.models.registry import get_entry

    settings = _settings(args, EMBED_FLAGS)
    entry = get_entry(settings.embed.model, settings.models)
    _print_result(embed_texts(args.texts, args.out, settings.embed, entry, args.column))


def cmd_mine(args: argparse.Namespace) -> None:
    from embedpipe.core import storage
    from embedpipe.mining.mine import mine_category, partition_by_category

    settings = _settings(args, MINE_FLAGS)
    partitions = partition_by_category(
        args.metadata, args.embeddings, storage.join(args.out, "partitions")
    )
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


def cmd_combine(args: argparse.Namespace) -> None:
    from embedpipe.mining.combine import combine_negatives

    _print_result(combine_negatives(args.inputs, args.out, args.num_samples, args.seed))


def cmd_to_hf(args: argparse.Namespace) -> None:
    from embedpipe.mining.to_hf import export_to_hf

    rows = export_to_hf(args.negatives, args.images, args.out, args.max_positives, args.seed)
    print(json.dumps({"out_uri": args.out, "rows": rows}))


def cmd_models(args: argparse.Namespace) -> None:
    from embedpipe.models.registry import listing_rows, load_registry  # no torch import

    settings = _settings(args)
    header = ["name", "library", "architecture", "weights", "dim", "input", "B200 batch", "towers"]
    rows = [header, *listing_rows(load_registry(settings.models))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def cmd_demo_data(args: argparse.Namespace) -> None:
    from embedpipe.data.demo_data import DemoSpec, generate_demo_dataset

    spec = DemoSpec(
        categories=args.categories,
        concepts=args.concepts,
        images=args.images,
        size=args.size,
        seed=args.seed,
    )
    manifest = generate_demo_dataset(args.out, spec)
    print(
        f"wrote {manifest['files']} files to {args.out} "
        f"({len(manifest['exact_duplicates'])} exact and "
        f"{len(manifest['near_duplicates'])} near duplicates, "
        f"{len(manifest['corrupt'])} corrupt files planted)"
    )


def cmd_run(args: argparse.Namespace) -> None:
    from embedpipe.pipelines.local import run_locally
    from embedpipe.pipelines.progress import Progress

    settings = _settings(args)
    progress = Progress(sys.stdout)
    outputs = run_locally(args.pipeline, settings, verbose=args.verbose, progress=progress)
    print(f"pipeline {args.pipeline} succeeded; outputs:")
    for name, uri in outputs.items():
        print(f"  {name}: {uri}")
    print(f"task logs: {progress.log_dir}")


def _cluster_settings(args: argparse.Namespace) -> Settings:
    """--config, then the overlay's cluster.toml and the pipeline root its settings.env names."""
    if not args.overlay:
        return _settings(args)
    from embedpipe.pipelines import deploy

    overlay = Path(args.overlay)
    settings_env = overlay / deploy.SETTINGS_FILE
    root = (
        deploy.read_env_file(settings_env).get("EMBEDPIPE_PIPELINE_ROOT")
        if settings_env.is_file()
        else None
    )
    return load_settings(
        args.config,
        {"cluster.pipeline_root": root},
        layers=(overlay / deploy.CLUSTER_FILE,),
    )


def cmd_compile(args: argparse.Namespace) -> None:
    from embedpipe.pipelines.compile import compile_pipelines

    settings = _cluster_settings(args)
    for path in compile_pipelines(settings, args.out or settings.global_.build_dir):
        print(path)


def cmd_image_refs(args: argparse.Namespace) -> None:
    settings = _cluster_settings(args)
    print(f"data={settings.images.data_image}")
    print(f"gpu={settings.images.gpu_image}")


def _kfp_client_factory(host: str | None):
    host = host or os.environ.get("KFP_HOST")
    if not host:
        raise ConfigError(
            "no KFP endpoint: pass --host or set KFP_HOST (e.g. http://localhost:8080)"
        )

    def connect():
        import kfp

        try:
            return kfp.Client(host=host)
        except Exception as error:  # urllib3, kfp_server_api and auth errors alike
            raise RuntimeError(f"cannot reach the KFP API at {host}: {error}") from None

    return connect


def cmd_render(args: argparse.Namespace) -> None:
    from embedpipe.pipelines import deploy

    credentials = (
        deploy.example_credentials(args.manifests)
        if args.example_credentials
        else deploy.object_store_credentials(args.manifests, args.credentials, os.environ)
    )
    print(deploy.redact(deploy.render(args.manifests, args.env, credentials)), end="")


def cmd_deploy(args: argparse.Namespace) -> None:
    from embedpipe.pipelines import deploy
    from embedpipe.pipelines.compile import compile_pipelines

    args.overlay = str(deploy.overlay_dir(args.manifests, args.env))
    settings = _cluster_settings(args)
    try:
        credentials = deploy.object_store_credentials(args.manifests, args.credentials, os.environ)
    except ConfigError as missing:
        if not args.dry_run or args.credentials:
            raise
        # A preview shows the Secret redacted anyway: let it run on a fresh checkout.
        print(f"# {missing}; the dry run goes on with placeholder values")
        credentials = deploy.example_credentials(args.manifests)
    rendered = deploy.render(args.manifests, args.env, credentials)
    packages = compile_pipelines(settings, settings.global_.build_dir)
    version = deploy.git_revision()
    if args.dry_run:
        print(f"# would apply (kubectl apply -f -), overlay {args.env}, Secret values redacted:")
        print(deploy.redact(rendered), end="")
        host = args.host or os.environ.get("KFP_HOST") or "$KFP_HOST"
        for package in packages:
            name = deploy.pipeline_name(package)
            print(f"# would upload {package} as pipeline {name}, version {version}, to {host}")
        return
    connect = _kfp_client_factory(args.host)
    deploy.apply(rendered)
    for upload in deploy.upload_pipelines(connect, packages, version):
        print(f"uploaded {upload.package}: pipeline {upload.pipeline} version {upload.version}")


def cmd_submit(args: argparse.Namespace) -> None:
    from embedpipe.pipelines import submit

    package = Path(args.build_dir) / f"{args.pipeline}.yaml"
    params = submit.parse_params(args.param, package) if package.is_file() else {}
    run_id = submit.submit(
        _kfp_client_factory(args.host),
        package,
        params,
        experiment=args.experiment,
        run_name=args.run_name or f"{args.pipeline}-{time.strftime('%Y%m%d-%H%M%S')}",
        service_account=args.service_account,
    )
    print(f"submitted {args.pipeline}: run {run_id}")


def build_parser() -> argparse.ArgumentParser:
    from embedpipe.pipelines import PIPELINE_NAMES

    parser = argparse.ArgumentParser(
        prog="embedpipe",
        description="Turn folders, tar archives or s3:// prefixes of images into catalogs, "
        "splits and (in later stages) trained embedding models, as Kubeflow pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"embedpipe {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = commands.add_parser(
        "ingest",
        help="images (folders, tar archives, s3:// prefixes) -> Parquet image shards",
        description="Read images laid out <category>/<concept>/<image> or "
        "<split>/<category>/<concept>/<image> and write Parquet shards. Unreadable "
        "images are listed in rejected.parquet and skipped.",
    )
    ingest.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="folder, .tar/.tar.gz archive or s3://bucket/prefix",
    )
    ingest.add_argument("--out", required=True, metavar="URI", help="output dataset folder")
    _add_flags(ingest, INGEST_FLAGS)
    ingest.set_defaults(handler=cmd_ingest)

    catalog = commands.add_parser(
        "catalog",
        help="image shards -> train/test catalog (Parquet + PerVA JSON)",
        description="Keep explicit train/test folders, or split each concept with "
        "--num-train (exact) or --train-fraction, seeded.",
    )
    catalog.add_argument("images", metavar="IMAGES", help="dataset written by `ingest`")
    catalog.add_argument("--out", required=True, metavar="URI", help="output catalog folder")
    _add_flags(catalog, CATALOG_FLAGS)
    catalog.set_defaults(handler=cmd_catalog)

    split = commands.add_parser(
        "split",
        help="catalog -> concept-level train/val splits",
        description="Hold out whole concepts for validation, per category, seeded.",
    )
    split.add_argument("catalog", metavar="CATALOG", help="dataset written by `catalog`")
    split.add_argument("--out", required=True, metavar="URI", help="output splits folder")
    _add_flags(split, SPLIT_FLAGS)
    split.set_defaults(handler=cmd_split)

    taxonomy = commands.add_parser(
        "taxonomy",
        help="species names -> accepted taxa, rank keys, taxon splits, captions",
        description="Resolve each image's species name against a GBIF/Darwin Core taxon "
        "table (synonyms to accepted names) and write species ids, the taxonomic tree, "
        "integer keys per rank, taxon-aware splits and per-split indexes with captions.",
    )
    taxonomy.add_argument("images", metavar="IMAGES", help="dataset written by `ingest`")
    taxonomy.add_argument("--out", required=True, metavar="URI", help="output folder")
    _add_flags(taxonomy, TAXONOMY_FLAGS)
    taxonomy.set_defaults(handler=cmd_taxonomy)

    dedup = commands.add_parser(
        "dedup",
        help="perceptual-hash duplicates, cross-split leakage report, optional drop",
        description="Group exact (same content hash) and near (perceptual hash within "
        "--max-distance bits) duplicates, report groups that span splits per category, "
        "write an HTML report and the kept selection.",
    )
    dedup.add_argument("images", metavar="IMAGES", help="dataset written by `ingest`")
    dedup.add_argument(
        "--splits",
        metavar="URI",
        help="dataset written by `split` or `catalog` (splits for the leakage report)",
    )
    dedup.add_argument("--out", required=True, metavar="URI", help="output folder")
    dedup.add_argument("--kept", metavar="URI", help="write the kept selection here (OUT/kept)")
    _add_flags(dedup, DEDUP_FLAGS)
    dedup.set_defaults(handler=cmd_dedup)

    embed = commands.add_parser(
        "embed",
        help="image shards -> Parquet embeddings with a registered model",
        description="Batched inference in DataLoader workers; resumes after the last "
        "finished shard when run again with the same settings.",
    )
    embed.add_argument("images", metavar="IMAGES", help="dataset written by `ingest`")
    embed.add_argument(
        "--select",
        metavar="URI",
        help="embed only the image ids of this dataset (e.g. dedup's kept/)",
    )
    embed.add_argument("--out", required=True, metavar="URI", help="output dataset folder")
    _add_flags(embed, EMBED_FLAGS)
    embed.set_defaults(handler=cmd_embed)

    embed_text = commands.add_parser(
        "embed-text",
        help="texts (captions, class prompts) -> Parquet embeddings with an image-text model",
    )
    embed_text.add_argument(
        "texts", metavar="TEXTS", help=".txt (one per line), .parquet file or dataset folder"
    )
    embed_text.add_argument("--column", default="text", help="text column in Parquet (text)")
    embed_text.add_argument("--out", required=True, metavar="URI", help="output dataset folder")
    _add_flags(embed_text, EMBED_FLAGS)
    embed_text.set_defaults(handler=cmd_embed_text)

    mine = commands.add_parser(
        "mine",
        help="per-category hard negatives with a faiss kNN index, difficulty bands",
        description="For each query image, its nearest images of other concepts in the same "
        "category (candidates from --candidate-splits only, so held-out images never become "
        "training negatives), its positives, and a difficulty band per negative.",
    )
    mine.add_argument(
        "metadata",
        metavar="METADATA",
        help="image ids with category/concept/split (dedup kept, or split output)",
    )
    mine.add_argument("embeddings", metavar="EMBEDDINGS", help="dataset written by `embed`")
    mine.add_argument(
        "--category", action="append", help="category to mine (repeatable; default: all)"
    )
    mine.add_argument(
        "--out",
        required=True,
        metavar="URI",
        help="output folder: OUT/partitions, and OUT/negatives/<category> for each",
    )
    _add_flags(mine, MINE_FLAGS)
    mine.set_defaults(handler=cmd_mine)

    combine = commands.add_parser("combine", help="per-category negatives -> one dataset")
    combine.add_argument("inputs", nargs="+", metavar="NEGATIVES", help="`mine` outputs")
    combine.add_argument("--out", required=True, metavar="URI")
    combine.add_argument("--num-samples", type=int, default=0, help="sample this many rows")
    combine.add_argument("--seed", type=int, default=0)
    combine.set_defaults(handler=cmd_combine)

    to_hf = commands.add_parser("to-hf", help="negatives + images -> Hugging Face Dataset")
    to_hf.add_argument("negatives", metavar="NEGATIVES", help="`combine` (or `mine`) output")
    to_hf.add_argument("images", metavar="IMAGES", help="dataset written by `ingest`")
    to_hf.add_argument("--out", required=True, metavar="URI", help="save_to_disk folder or s3://")
    to_hf.add_argument("--max-positives", type=int, default=1, help="positive images per row")
    to_hf.add_argument("--seed", type=int, default=0)
    to_hf.set_defaults(handler=cmd_to_hf)

    models = commands.add_parser("models", help="list the model registry")
    models.add_argument("--config", metavar="FILE", help="TOML config with [models.NAME] entries")
    models.set_defaults(handler=cmd_models)

    demo = commands.add_parser(
        "demo-data",
        help="generate a small deterministic dataset with planted duplicates and corrupt files",
    )
    demo.add_argument("out", metavar="OUT", help="output folder (or s3:// prefix)")
    demo.add_argument("--categories", type=int, default=4, help="shape families (4)")
    demo.add_argument("--concepts", type=int, default=5, help="objects per category (5)")
    demo.add_argument("--images", type=int, default=20, help="views per object (20)")
    demo.add_argument("--size", type=int, default=128, help="image side in pixels (128)")
    demo.add_argument("--seed", type=int, default=0, help="generator seed (0)")
    demo.set_defaults(handler=cmd_demo_data)

    run = commands.add_parser(
        "run",
        help="run a pipeline on this machine through kfp.local",
        description="Runs the real KFP pipeline with kfp.local's SubprocessRunner; "
        "artifacts go under [global].pipeline_root, each task's log under the run "
        "folder's logs/.",
    )
    run.add_argument("pipeline", choices=PIPELINE_NAMES)
    run.add_argument("--config", metavar="FILE", required=True, help="TOML config")
    run.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="stream kfp.local's output and every task's log (else: a line per task)",
    )
    run.set_defaults(handler=cmd_run)

    overlay_help = "a manifests/overlays/ENV folder: its cluster.toml and pipeline root apply"
    compile_ = commands.add_parser("compile", help="compile every pipeline to IR YAML")
    compile_.add_argument("--config", metavar="FILE", help="TOML config (images, defaults)")
    compile_.add_argument("--overlay", metavar="DIR", help=overlay_help)
    compile_.add_argument("--out", metavar="DIR", help="output folder ([global].build_dir)")
    compile_.set_defaults(handler=cmd_compile)

    image_refs = commands.add_parser("image-refs", help="print the data and GPU image references")
    image_refs.add_argument("--config", metavar="FILE", help="TOML config ([images])")
    image_refs.add_argument("--overlay", metavar="DIR", help=overlay_help)
    image_refs.set_defaults(handler=cmd_image_refs)

    manifests_help = "the Kustomize tree (manifests)"
    credentials_help = "KEY=VALUE file with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    render = commands.add_parser(
        "render", help="print an overlay's manifests as they would be applied, secrets redacted"
    )
    render.add_argument("env", metavar="ENV", help="overlay name under manifests/overlays")
    render.add_argument("--manifests", default="manifests", help=manifests_help)
    render.add_argument("--credentials", metavar="FILE", help=credentials_help)
    render.add_argument(
        "--example-credentials",
        action="store_true",
        help="use object-store.env.example's placeholders (for linting)",
    )
    render.set_defaults(handler=cmd_render)

    deploy_ = commands.add_parser(
        "deploy",
        help="apply an overlay and upload every pipeline as a version named by git revision",
    )
    deploy_.add_argument("env", metavar="ENV", help="overlay name under manifests/overlays")
    deploy_.add_argument("--config", metavar="FILE", help="TOML config (images, defaults)")
    deploy_.add_argument("--manifests", default="manifests", help=manifests_help)
    deploy_.add_argument("--credentials", metavar="FILE", help=credentials_help)
    deploy_.add_argument("--host", help="KFP API endpoint (default: $KFP_HOST)")
    deploy_.add_argument(
        "--dry-run", action="store_true", help="print what would be applied and uploaded"
    )
    deploy_.set_defaults(handler=cmd_deploy)

    submit_ = commands.add_parser(
        "submit", help="start a run of a compiled pipeline on a KFP endpoint (like kfp run submit)"
    )
    submit_.add_argument("pipeline", choices=PIPELINE_NAMES)
    submit_.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="a pipeline parameter"
    )
    submit_.add_argument("--experiment", "-e", default="embedpipe", help="experiment (embedpipe)")
    submit_.add_argument("--run-name", "-r", help="run name (PIPELINE-date-time)")
    submit_.add_argument("--host", help="KFP API endpoint (default: $KFP_HOST)")
    submit_.add_argument("--service-account", help="run the pods as this service account")
    submit_.add_argument("--build-dir", default="build", help="where the compiled YAML is (build)")
    submit_.set_defaults(handler=cmd_submit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args.handler(args)
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except ConfigError as error:
        print(f"embedpipe: {error}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        log.debug("failed", exc_info=True)
        print(f"embedpipe {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
