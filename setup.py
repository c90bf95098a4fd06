"""Package map: each top-level folder of the repository is a subpackage of `meshd`.

`package-dir` maps `meshd.scheduler` to `scheduler/` and so on, so no generic top-level name
(`scheduler`, `proto`) is ever installed. The package list is derived from the folders, so a new
subpackage needs no edit here. Everything else lives in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup

PACKAGE_DIRS = {
    "meshd": "meshd",
    "meshd.proto": "proto",
    "meshd.coordinator": "coordinator",
    "meshd.node_agent": "node_agent",
    "meshd.kv_transfer": "kv_transfer",
    "meshd.scheduler": "scheduler",
}


def _packages() -> list[str]:
    found = []
    for name, folder in PACKAGE_DIRS.items():
        root = Path(folder)
        for init in sorted(root.rglob("__init__.py")):
            rel = init.parent.relative_to(root).parts
            found.append(".".join((name, *rel)))
    return found


setup(package_dir=PACKAGE_DIRS, packages=_packages())
