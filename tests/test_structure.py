"""The package's architecture, measured: layers, import cycles and size limits.

Reads every module of ``src/repa`` with :mod:`ast` (nothing is imported), so the checks hold for
imports written anywhere, including the lazy ones inside functions. See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "repa"
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 100
# The recipe and everything above it: the only modules allowed to import ``repa.sit``.
UPPER = ("repa.sit", "repa.cli", "repa.__main__", "repa.probe")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _in(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``repa`` modules that module ``name`` imports, anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when one exists
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import repa.sit.data`` -> the module itself
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_edge(importer: str, imported: str) -> bool:
    """A package's ``__init__`` re-exporting its own submodules is not a cycle between modules."""
    return _in(importer, imported) or _in(imported, importer)


def test_the_import_reader_sees_lazy_and_relative_imports() -> None:
    graph = _graph()
    assert "repa.errors" in graph["repa.losses"]  # ``from .errors import ...`` at the top
    assert "repa.encoders.registry" in graph["repa.encoders.builtin"]
    # a hand-made cycle is found: the reader is able to fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules() -> None:
    graph = _graph()
    # a package importing its own submodules (and those importing siblings through it) is how
    # packages expose names; the cycles that matter run between distinct modules
    pruned = {v: {w for w in ws if not _package_edge(v, w)} for v, ws in graph.items()}
    assert _cycles(pruned) == []


def test_nothing_below_the_recipe_imports_it() -> None:
    bad = []
    for name, imported in _graph().items():
        if any(_in(name, top) for top in UPPER):
            continue
        for target in sorted(imported):
            if any(_in(target, top) for top in UPPER):
                bad.append(f"{name} imports {target}")
    assert bad == []


def test_no_module_over_the_line_limit() -> None:
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_the_line_limit() -> None:
    long = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name} (line {node.lineno})"] = n
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_moved_names_keep_their_old_paths() -> None:
    import repa._distributed as dist_mod
    import repa._images as images
    import repa.datasets as datasets
    import repa.sit.data as old_data
    import repa.sit.distributed as old_dist

    assert old_data.center_crop is images.center_crop and old_data.IMAGE_EXTENSIONS == images.IMAGE_EXTENSIONS
    assert old_data.open_dataset is datasets.open_dataset and old_data.DataInfo is datasets.DataInfo
    assert old_dist.init_distributed is dist_mod.init_distributed
    from repa import __version__
    from repa._version import __version__ as version

    assert __version__ == version


def test_the_old_latent_folders_warn_toward_repa_cache(tmp_path) -> None:
    import pytest

    from repa.errors import DataNotFoundError
    from repa.sit.data import LatentDataset, main

    with pytest.warns(DeprecationWarning, match="repa cache --vae"):
        with pytest.raises(DataNotFoundError, match="meta.json"):
            LatentDataset(tmp_path)
    with pytest.warns(DeprecationWarning, match="repa cache --vae"):
        assert main(["prepare-latents", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 1


def test_the_probe_lives_in_the_tools_and_the_recipe_and_keeps_its_old_names() -> None:
    import math

    import torch

    import repa.probe
    import repa.probing
    import repa.sit.probe
    from repa.probing import _interpolation

    assert repa.probe.probe_alignment is repa.probing.probe_alignment
    assert repa.probe.main is repa.sit.probe.main and repa.probe.add_arguments is repa.sit.probe.add_arguments
    x, eps, t = torch.full((1, 2), 2.0), torch.full((1, 2), 4.0), torch.tensor([0.25])
    assert torch.allclose(_interpolation("linear")(x, eps, t), torch.full((1, 2), 0.75 * 2 + 0.25 * 4))
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)  # t = 0.25 on the cosine path
    assert torch.allclose(_interpolation("cosine")(x, eps, t), torch.full((1, 2), 2 * c + 4 * s))


def test_the_video_cache_keeps_its_old_module_name() -> None:
    import repa.cache.video
    import repa.video_cache

    assert repa.video_cache is repa.cache.video
    from repa.video_cache import build_video_cache

    assert build_video_cache is repa.cache.video.build_video_cache
