"""One command per library stage: its inputs as arguments, its options from its settings."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from embedpipe.cli.flags import add_settings_flags, settings_flags, settings_from_args
from embedpipe.config import STAGE_SETTINGS, ConfigError, Section, Settings, TrainSettings

if TYPE_CHECKING:
    from embedpipe.train.inputs import TrainInputs


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


def _embed_entry(settings: Settings):
    """A published model (local-dir:, hf-hub:) or a trained checkpoint carries its own
    entry, so --weights needs no --model; else the registry's entry of --model."""
    from embedpipe.models.loading import checkpoint_entry, entry_for_weights
    from embedpipe.models.registry import get_entry

    weights = settings.embed.weights
    return (
        entry_for_weights(weights)
        or checkpoint_entry(weights)
        or get_entry(settings.embed.model, settings.models)
    )


def run_embed(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.embed.openmp import passive_wait

    passive_wait()  # before torch loads
    from embedpipe.embed.images import embed_images

    entry = _embed_entry(settings)
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

    entry = _embed_entry(settings)
    _print_result(embed_texts(args.texts, args.out, settings.embed, entry, args.column))


def inputs_embed_text(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "texts", metavar="TEXTS", help=".txt (one per line), .parquet file or dataset folder"
    )
    parser.add_argument("--column", default="text", help="text column in Parquet (text)")
    _out(parser)


def run_embed_signal(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.embed.openmp import passive_wait

    passive_wait()  # before torch loads
    from embedpipe.embed.signals import embed_signals

    entry = _signal_entry(settings, getattr(args, "embed__model", None))
    _print_result(embed_signals(args.images, args.out, settings.embed, args.column, entry))


def _signal_entry(settings: Settings, model_flag: str | None):
    """The signal encoder ``--weights`` carries (a signal checkpoint, an image_signal
    checkpoint's signal tower, a published two-tower model's), so it needs no --model, and
    a --model that names another encoder is refused; else the registry's entry of --model."""
    from embedpipe.models.registry import get_entry
    from embedpipe.models.two_towers import same_encoder, signal_entry_for_weights

    weights = settings.embed.weights
    carried = signal_entry_for_weights(weights) if weights else None
    if carried is None:
        return get_entry(settings.embed.model, settings.models)
    if model_flag is not None:
        given = get_entry(model_flag, settings.models)
        if not same_encoder(given, carried):
            raise ConfigError(
                f"--model {given.name}: --weights {weights} carries the signal encoder "
                f"{carried.name} ({carried.architecture}, {carried.embed_dim} dims); leave "
                "out --model"
            )
    return carried


def inputs_embed_signal(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", metavar="IMAGES", help="images dataset with a signal column (list<float32>)"
    )
    parser.add_argument("--column", required=True, help="the signal column to embed")
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


def run_train(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.models.registry import get_entry
    from embedpipe.train.inputs import TrainInputs
    from embedpipe.train.launch import launch_training

    config = settings.train
    # head mode: the model that made the embeddings (the head's backbone)
    entry = get_entry(config.model, settings.models)
    inputs = TrainInputs.from_dict(vars(args))
    result = launch_training(inputs, args.out, config, entry, settings.models)
    if os.environ.get("RANK", "0") == "0":  # one result line, from rank 0
        _print_result(result)


def inputs_train(parser: argparse.ArgumentParser) -> None:
    _images_input(parser)
    parser.add_argument(
        "--splits",
        metavar="URI",
        help="`split` output (train/val rows) or a selection (dedup kept)",
    )
    parser.add_argument(
        "--negatives", metavar="URI", help="`mine`/`combine` output: hard negatives in the batch"
    )
    parser.add_argument(
        "--embeddings", metavar="URI", help="`embed` output: the frozen inputs of a head"
    )
    parser.add_argument(
        "--captions", metavar="URI", help="taxonomy index: captions and rank keys per image"
    )
    _out(parser, "output folder: the trained model, checkpoints/, .embedpipe/metrics.json")


def train_arguments(
    inputs: TrainInputs, out: str, train: TrainSettings, searched: dict[str, str] | None = None
) -> list[str]:
    """``train IMAGES --out OUT ...``: the arguments after ``embedpipe`` of the command that
    trains ``out`` from ``inputs`` with ``train`` (``--key=PLACEHOLDER`` for each searched
    key), as a pod on the cluster runs it."""
    arguments = ["train", inputs.images, "--out", out, *inputs.flags()]
    return arguments + settings_flags("train", train, searched)


def mine_arguments(
    metadata: str, embeddings: str, out: str, mine: Section, searched: dict[str, str] | None = None
) -> list[str]:
    """``mine METADATA EMBEDDINGS --out OUT ...``: the arguments after ``embedpipe`` of the
    command that mines every category into ``OUT/negatives/<category>`` with ``mine``
    (``--key=PLACEHOLDER`` for each searched key)."""
    return ["mine", metadata, embeddings, "--out", out, *settings_flags("mine", mine, searched)]


def combine_arguments(inputs: list[str], out: str, combine: Section) -> list[str]:
    """``combine NEGATIVES... --out OUT ...``, as ``mine_arguments``."""
    return ["combine", *inputs, "--out", out, *settings_flags("combine", combine)]


def run_tune(args: argparse.Namespace, settings: Settings) -> None:
    tune, train = settings.tune, settings.train
    if tune.backend == "katib":
        _run_katib(args, settings)
        return
    if args.dry_run:
        raise ConfigError("--dry-run prints the Katib Experiment: give it with --backend katib")
    from embedpipe.models.registry import get_entry
    from embedpipe.train.inputs import TrainInputs
    from embedpipe.tune.study import tune_model

    inputs = TrainInputs.from_dict(vars(args))
    entry = get_entry(train.model, settings.models)
    result = tune_model(
        inputs.images,
        args.out,
        tune,
        train,
        entry,
        **inputs.keywords(),
        mine=settings.mine,
        combine=settings.combine,
        models=settings.models,
    )
    _print_result(result)


def _run_katib(args: argparse.Namespace, settings: Settings) -> None:
    """The Experiment the cluster's tune step would create, named after --out; printed as
    YAML with --dry-run, else created (kubeconfig) and followed to the end."""
    from embedpipe.core import storage
    from embedpipe.kube.objects import check_cluster_model, object_name
    from embedpipe.train.inputs import TrainInputs
    from embedpipe.tune import katib

    tune, train = settings.tune, settings.train
    check_cluster_model(train, settings.models)
    inputs, out = TrainInputs.from_dict(vars(args)), args.out
    name = object_name("embedpipe-tune", storage.normalize(out))
    image, cluster = settings.images.gpu_image, settings.cluster
    if args.dry_run:
        import yaml

        experiment = katib.build_experiment(
            name, tune, train, inputs, out, image, cluster, tune.namespace,
            command=train_arguments, mine=settings.mine, combine=settings.combine,
            mine_command=mine_arguments, combine_command=combine_arguments,
        )  # fmt: skip
        print(yaml.safe_dump(katib.experiment_dict(experiment), sort_keys=False), end="")
        return
    search = katib.launch_search(
        name, tune, train, inputs, out, image, cluster,
        command=train_arguments, mine=settings.mine, combine=settings.combine,
        mine_command=mine_arguments, combine_command=combine_arguments,
    )  # fmt: skip
    _print_result(search)


def inputs_tune(parser: argparse.ArgumentParser) -> None:
    inputs_train(parser)
    for action in parser._actions:
        if action.dest == "out":
            action.help = (
                "output folder: trials/, runs/, best.json, report.html and the study "
                "(katib: the prefix trials write their models under)"
            )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --backend katib: print the Experiment as YAML, create nothing",
    )


def run_publish(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.publish.stage import publish_checkpoint

    _print_result(
        publish_checkpoint(
            args.checkpoint,
            args.out,
            settings.publish,
            args.metrics or "",
            args.lineage or [],
            args.check_images or "",
        )
    )


def inputs_publish(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint folder (local or s3://) from training"
    )
    _out(parser, "folder (local or s3://) to write the published model to")
    parser.add_argument(
        "--metrics", metavar="URI", help="an evaluation's metrics.json, for the card"
    )
    parser.add_argument(
        "--lineage",
        action="append",
        metavar="URI",
        help="a dataset the model was trained from (images, dedup output...), for the card "
        "(repeatable)",
    )
    parser.add_argument(
        "--check-images",
        metavar="URI",
        help="images dataset whose first images the reload check embeds (default: generated)",
    )


class _AppendSource(argparse.Action):
    """--weights / --embeddings in the order given; --text-embeddings pairs with the
    --embeddings before it."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        sources = list(getattr(namespace, "sources", None) or [])
        if option_string == "--text-embeddings":
            if not sources or sources[-1][0] != "embeddings" or sources[-1][2]:
                parser.error("--text-embeddings follows the --embeddings it belongs to")
            sources[-1] = ("embeddings", sources[-1][1], value)
        else:
            sources.append((option_string.removeprefix("--"), value, ""))
        namespace.sources = sources


def run_evaluate(args: argparse.Namespace, settings: Settings) -> None:
    from embedpipe.embed.openmp import passive_wait

    passive_wait()  # before torch loads
    from embedpipe.evaluate.sources import EmbeddingsSource, ModelSource
    from embedpipe.evaluate.stage import evaluate_models

    sources = [
        ModelSource(value) if kind == "weights" else EmbeddingsSource(value, texts)
        for kind, value, texts in args.sources or []
    ]
    if not sources:
        raise ConfigError("evaluate: give --weights MODEL or --embeddings URI (repeatable)")
    result = evaluate_models(
        sources,
        args.metadata,
        args.out,
        settings.evaluate,
        args.images or "",
        settings.models,
        args.select or "",
    )
    _print_result(result)


def inputs_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "metadata",
        metavar="METADATA",
        help="images with their ground truth: an `ingest`, `split` or `dedup` output",
    )
    parser.add_argument(
        "--images", metavar="URI", help="`ingest` output the models read (default: METADATA)"
    )
    parser.add_argument(
        "--select", metavar="URI", help="evaluate only the image ids of this dataset (dedup kept)"
    )
    parser.add_argument(
        "--weights",
        action=_AppendSource,
        metavar="MODEL",
        help="a registry entry, checkpoint folder, local-dir:DIR, or weights for --model "
        "(repeatable: models side by side)",
    )
    parser.add_argument(
        "--embeddings",
        action=_AppendSource,
        metavar="URI",
        help="precomputed `embed` output (repeatable)",
    )
    parser.add_argument(
        "--text-embeddings",
        action=_AppendSource,
        metavar="URI",
        help="`embed-text` output of the prompts and captions, for the --embeddings before it",
    )
    parser.set_defaults(sources=None)
    _out(
        parser,
        "output folder: per-image results; .embedpipe/ holds metrics.json, "
        "confusion_matrix.json and report.html",
    )


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
        "embed-signal",
        "embed",
        inputs_embed_signal,
        run_embed_signal,
        "a signal column (spectra, time series) -> Parquet signal embeddings",
        "Embed one list<float32> column of an images dataset with a signal encoder "
        "(--model signal_transformer, signal_cnn, ... or --weights a signal checkpoint), "
        "one row per image_id, in batches; [embed]'s model, weights, seed, batch size, "
        "device, precision, normalize and dim apply (its image decoding options do not). "
        "Missing or non-finite signals are skipped and listed; a rerun with the same "
        "settings resumes after the last finished shard.",
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
    StageCommand(
        "train",
        "train",
        inputs_train,
        run_train,
        "fine-tune an open_clip model or train a projection head (contrastive losses)",
        "Fine-tune a registry model on image-text or image-image pairs, or train an MLP "
        "head on frozen embeddings; hard negatives in the batch, validation recall@K on "
        "held-out concepts, checkpoints that a rerun of the same command resumes from, "
        "several GPUs with --nproc-per-node.",
    ),
    StageCommand(
        "tune",
        "tune",
        inputs_tune,
        run_tune,
        "search [train] settings: an Optuna study here, or a Katib Experiment (--backend katib)",
        "Train a trial per point of the [tune.space] search space (settings of [train], "
        "which --config gives), prune trials below the median at a validation, and write "
        "the trials table, the best parameters and a report. Run it again to resume a "
        "stopped study. --backend katib --dry-run prints the Katib Experiment instead.",
    ),
    StageCommand(
        "evaluate",
        "evaluate",
        inputs_evaluate,
        run_evaluate,
        "zero-shot, retrieval, probes, anomalies and plots for models or embeddings",
        "Evaluate one or more models (--weights) or precomputed embeddings (--embeddings) "
        "on the same images, side by side: clip_benchmark's zero-shot and image-text "
        "retrieval metrics, image->image retrieval per category, linear and regression "
        "probes, kNN and IsolationForest anomaly scores, and an HTML report.",
    ),
    StageCommand(
        "publish",
        "publish",
        inputs_publish,
        run_publish,
        "checkpoint -> open_clip Hugging Face layout (or transformers head) + model card",
        "Write what open_clip loads with create_model_and_transforms('local-dir:OUT') or "
        "'hf-hub:ORG/NAME' (a projection head: a transformers custom model), with a model "
        "card; reload it and compare embeddings with the checkpoint's; --push uploads it "
        "(token from HF_TOKEN or --token-file).",
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
