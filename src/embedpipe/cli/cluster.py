"""Cluster commands: render and apply manifests, upload pipelines, submit runs."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from embedpipe.cli.pipelines import cluster_settings
from embedpipe.config import ConfigError


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
    settings = cluster_settings(args)
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
    params = submit.parse_params(args.param, package, args.overrides) if package.is_file() else {}
    run_id = submit.submit(
        _kfp_client_factory(args.host),
        package,
        params,
        experiment=args.experiment,
        run_name=args.run_name or f"{args.pipeline}-{time.strftime('%Y%m%d-%H%M%S')}",
        service_account=args.service_account,
    )
    print(f"submitted {args.pipeline}: run {run_id}")


def add_cluster_commands(commands: argparse._SubParsersAction) -> None:
    from embedpipe.pipelines import PIPELINE_NAMES

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
    submit_.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="STAGE.KEY=VALUE",
        help="override one stage setting over the compiled defaults, e.g. dedup.max_distance=4 "
        "(validated before anything is sent)",
    )
    submit_.add_argument("--experiment", "-e", default="embedpipe", help="experiment (embedpipe)")
    submit_.add_argument("--run-name", "-r", help="run name (PIPELINE-date-time)")
    submit_.add_argument("--host", help="KFP API endpoint (default: $KFP_HOST)")
    submit_.add_argument("--service-account", help="run the pods as this service account")
    submit_.add_argument("--build-dir", default="build", help="where the compiled YAML is (build)")
    submit_.set_defaults(handler=cmd_submit)
