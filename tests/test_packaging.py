"""Packaging facts that other files rely on: one version, the torch floor, the dev tools."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_is_written_once():
    import repa
    from repa import _version

    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "repa._version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", _version.__version__)
    assert repa.__version__ == _version.__version__


def test_the_torch_floor_has_what_the_models_use():
    deps = _pyproject()["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if re.match(r"torch\b", d)]
    floor = tuple(int(p) for p in re.search(r">=\s*(\d+)\.(\d+)", torch_dep).groups())
    assert floor >= (2, 4)  # nn.RMSNorm (the SiT's qk-norm) arrived in torch 2.4
    import torch

    assert hasattr(torch.nn, "RMSNorm")


def test_the_dev_extra_has_the_lint_and_type_tools():
    dev = " ".join(_pyproject()["project"]["optional-dependencies"]["dev"])
    assert "ruff" in dev and "mypy" in dev
