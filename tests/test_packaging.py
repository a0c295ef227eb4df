"""The explicit package list in pyproject must name every package, or a regular
(non-editable) install, such as the container image's, silently lacks it."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            found.add(".".join([package, *parts]))
    assert found == listed


def test_registry_data_ships_with_the_package():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-data"]["embedpipe.models"] == ["registry.toml"]


def test_data_stages_do_not_import_torch():
    """The CPU stages must run in a slim image without torch, and start fast."""
    import subprocess
    import sys

    modules = [
        "cli",
        "ingest",
        "catalog",
        "splits",
        "dedup",
        "mine",
        "combine",
        "hf_export",
        "taxonomy.stage",
        "models.registry",
        "demo_data",
    ]
    code = ";".join(f"import embedpipe.{m}" for m in modules)
    code += ";import sys;print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
