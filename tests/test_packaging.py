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


# Packages that run in the slim data image: neither torch nor kfp may load with them
# (kfp only where a component or pipeline is built; torch only for the model stages).
TORCH_FREE_PACKAGES = ("cli", "config", "core", "data", "kube", "mining", "taxonomy")
TORCH_FREE_MODULES = ("models.registry", "tune.space", "tune.katib")


def _library_modules(package: str) -> list[str]:
    folder = REPO / "src" / "embedpipe" / package
    return [
        ".".join(
            ["embedpipe", *path.relative_to(REPO / "src" / "embedpipe").with_suffix("").parts]
        ).removesuffix(".__init__")
        for path in sorted(folder.rglob("*.py"))
    ]


def test_data_stages_import_neither_torch_nor_kfp():
    """The CPU stages must run in a slim image without torch, and start fast."""
    import subprocess
    import sys

    modules = [m for package in TORCH_FREE_PACKAGES for m in _library_modules(package)]
    modules += [f"embedpipe.{m}" for m in TORCH_FREE_MODULES]
    assert "embedpipe.data.ingest" in modules and "embedpipe.mining.to_hf" in modules
    code = ";".join(f"import {m}" for m in modules)
    code += ";import sys;print('torch' in sys.modules, 'kfp' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False False"


def _lock_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock", REPO / "images" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_constraints_pin_what_pyproject_pins():
    lock = _lock_module()
    pins = lock.read_constraints(lock.CONSTRAINTS)
    assert lock.disagreements(lock.project_requirements(), pins) == []
    assert pins["faiss-gpu"] == "1.15.1" and pins["kfp-kubernetes"] == "2.17.0"


def test_the_data_image_requirement_tree_has_no_torch():
    lock = _lock_module()
    data_image = lock.resolve(lock.project_requirements(), extras=())
    assert {"kfp", "kfp-kubernetes", "faiss-cpu", "pyarrow"} <= set(data_image)
    assert not {"torch", "torchvision", "open-clip-torch", "triton"} & set(data_image)
    for name in ("torch", "faiss-gpu"):  # the GPU image's tree adds them
        assert name in lock.resolve(lock.project_requirements())


def test_both_dockerfiles_install_under_the_constraints_as_a_non_root_user():
    for image in ("data", "gpu"):
        text = (REPO / "images" / image / "Dockerfile").read_text()
        assert "--constraint images/constraints.txt" in text
        assert "USER 10001:10001" in text
        assert "ARG BASE_IMAGE=" in text
        assert 'CMD ["embedpipe", "--version"]' in text
