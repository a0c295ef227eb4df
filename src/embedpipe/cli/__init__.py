"""The ``embedpipe`` command: one subcommand per stage, plus pipeline and cluster commands.

Every stage flag is derived from that stage's settings model and overrides the
same key of the ``--config`` TOML file; a flag left out keeps the file's value.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from embedpipe import LOG_FORMAT, __version__
from embedpipe.cli.cluster import add_cluster_commands
from embedpipe.cli.pipelines import add_pipeline_commands
from embedpipe.cli.stages import add_stage_commands
from embedpipe.config import ConfigError, load_settings

log = logging.getLogger("embedpipe")
# demo-data's flags: fields of embedpipe.data.demo_data.DemoSpec, which holds the defaults.
DEMO_FLAGS = {
    "categories": "shape families (default: 4)",
    "concepts": "objects per shape (default: 6)",
    "images": "views per object (default: 20)",
    "size": "image side in pixels (default: 128)",
    "seed": "generator seed (default: 0)",
}


def cmd_models(args: argparse.Namespace) -> None:
    from embedpipe.models.registry import listing_rows, load_registry  # no torch import

    settings = load_settings(args.config)
    header = ["name", "library", "architecture", "weights", "dim", "input", "B200 batch", "towers"]
    rows = [header, *listing_rows(load_registry(settings.models))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


# The same flags for `demo-data --kind signals`: fields of demo_signals.SignalDemoSpec.
SIGNAL_DEMO_FIELDS = {
    "categories": "types",
    "concepts": "objects",
    "images": "views",
    "size": "size",
    "seed": "seed",
}


def cmd_demo_data(args: argparse.Namespace) -> None:
    given = {key: getattr(args, key) for key in DEMO_FLAGS if getattr(args, key) is not None}
    if args.kind == "signals":
        from embedpipe.data.demo_signals import SignalDemoSpec, generate_signal_demo

        spec = SignalDemoSpec(**{SIGNAL_DEMO_FIELDS[key]: value for key, value in given.items()})
        manifest = generate_signal_demo(args.out, spec)
        print(
            f"wrote {manifest['images']} images of {len(manifest['objects'])} objects and "
            f"{args.out}/{manifest['signals']} (one spectrum with a planted NaN); ingest with: "
            f"embedpipe ingest {args.out} --out IMAGES --signals {args.out}/{manifest['signals']} "
            "--signal-key source"
        )
        return
    from embedpipe.data.demo_data import DemoSpec, generate_demo_dataset

    spec = DemoSpec(**given)  # a flag left out keeps DemoSpec's default
    manifest = generate_demo_dataset(args.out, spec)
    print(
        f"wrote {manifest['files']} files to {args.out} "
        f"({len(manifest['exact_duplicates'])} exact and "
        f"{len(manifest['near_duplicates'])} near duplicates, "
        f"{len(manifest['corrupt'])} corrupt files planted)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedpipe",
        description="Turn folders, tar archives or s3:// prefixes of images into catalogs, "
        "splits, embeddings and hard negatives, as Kubeflow pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"embedpipe {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_stage_commands(commands)

    models = commands.add_parser("models", help="list the model registry")
    models.add_argument("--config", metavar="FILE", help="TOML config with [models.NAME] entries")
    models.set_defaults(handler=cmd_models)

    demo = commands.add_parser(
        "demo-data",
        help="generate a small deterministic dataset with planted duplicates and corrupt files "
        "(or, with --kind signals, images paired with spectra)",
    )
    demo.add_argument("out", metavar="OUT", help="output folder (or s3:// prefix)")
    demo.add_argument(
        "--kind",
        choices=["images", "signals"],
        default="images",
        help="images: shapes with planted duplicates and corrupt files; signals: galaxy-like "
        "images with spectra and redshift/stellar_mass sharing hidden parameters, where "
        "--categories, --concepts, --images, --size mean galaxy types, objects per type, "
        "views per object, pixels (defaults 3, 40, 4, 64) (default: images)",
    )
    for key, help_text in DEMO_FLAGS.items():
        demo.add_argument(f"--{key}", type=int, help=help_text)
    demo.set_defaults(handler=cmd_demo_data)

    add_pipeline_commands(commands)
    add_cluster_commands(commands)
    return parser


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread so that every ``with`` block unwinds: locks are
    released and temporary files removed, as on Ctrl-C."""


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        args.handler(args)
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except ConfigError as error:
        print(f"embedpipe: {error}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as error:
        log.debug("failed", exc_info=True)
        print(f"embedpipe {args.command}: error: {error}", file=sys.stderr)
        return 1
    except Terminated as terminated:
        print(f"embedpipe {args.command}: terminated", file=sys.stderr)
        return terminated.code
    except KeyboardInterrupt:
        print(f"embedpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
