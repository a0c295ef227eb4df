"""Commands over whole pipelines: run one locally, compile them all, name the images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embedpipe.config import Settings, load_settings

OVERLAY_HELP = "a manifests/overlays/ENV folder: its cluster.toml and pipeline root apply"


def cmd_run(args: argparse.Namespace) -> None:
    from embedpipe.pipelines import pipeline_module
    from embedpipe.pipelines.local import run_locally
    from embedpipe.pipelines.progress import Progress

    settings = load_settings(args.config)
    progress = Progress(sys.stdout)
    outputs = run_locally(args.pipeline, settings, verbose=args.verbose, progress=progress)
    print(f"pipeline {args.pipeline} succeeded; outputs:")
    for name, uri in outputs.items():
        print(f"  {name}: {uri}")
    print(f"task logs: {progress.log_dir}")
    summary = getattr(pipeline_module(args.pipeline), "summary", None)
    for line in summary(outputs) if summary else ():
        print(line)


def cluster_settings(args: argparse.Namespace) -> Settings:
    """--config, then the overlay's cluster.toml and the pipeline root its settings.env names."""
    if not getattr(args, "overlay", None):
        return load_settings(args.config)
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

    settings = cluster_settings(args)
    for path in compile_pipelines(settings, args.out or settings.global_.build_dir):
        print(path)


def cmd_image_refs(args: argparse.Namespace) -> None:
    settings = cluster_settings(args)
    print(f"data={settings.images.data_image}")
    print(f"gpu={settings.images.gpu_image}")


def add_pipeline_commands(commands: argparse._SubParsersAction) -> None:
    from embedpipe.pipelines import PIPELINE_NAMES

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

    compile_ = commands.add_parser("compile", help="compile every pipeline to IR YAML")
    compile_.add_argument("--config", metavar="FILE", help="TOML config (images, defaults)")
    compile_.add_argument("--overlay", metavar="DIR", help=OVERLAY_HELP)
    compile_.add_argument("--out", metavar="DIR", help="output folder ([global].build_dir)")
    compile_.set_defaults(handler=cmd_compile)

    image_refs = commands.add_parser("image-refs", help="print the data and GPU image references")
    image_refs.add_argument("--config", metavar="FILE", help="TOML config ([images])")
    image_refs.add_argument("--overlay", metavar="DIR", help=OVERLAY_HELP)
    image_refs.set_defaults(handler=cmd_image_refs)
