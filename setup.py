"""Build step that ships the checkout's data files in the wheel (everything else is in pyproject.toml).

The config schema, the default configs and the embedded default's prompts stay where the workflow and the users'
commands expect them (``workflow/schemas/``, ``config/``); building copies them into ``esr/_packaged/<repo path>``
so an installed wheel finds them (``esr.config.data_file``). One source of truth: the list is
``esr.config.PACKAGED_FILES``, read here from the source without importing the package (no dependencies needed at
build time). Editable installs and source checkouts read the checkout's files directly."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def packaged_files() -> tuple[str, ...]:
    """``esr.config.PACKAGED_FILES``, read from ``src/esr/config.py`` with ``ast`` (a literal tuple of strings)."""
    tree = ast.parse((HERE / "src" / "esr" / "config.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PACKAGED_FILES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError("src/esr/config.py defines no PACKAGED_FILES tuple")


class BuildPyWithData(build_py):
    """``build_py`` plus the copy of :func:`packaged_files` into ``<build_lib>/esr/_packaged/``."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout itself
            return
        target = Path(self.build_lib) / "esr" / "_packaged"
        for rel in packaged_files():
            src = HERE / rel
            if not src.is_file():
                raise FileNotFoundError(f"setup.py: packaged file {rel!r} is missing from the source tree ({src})")
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)


setup(cmdclass={"build_py": BuildPyWithData})
