"""Resolve which modules to hook and capture their outputs with forward hooks.

``layers`` may be a dotted module name (exactly as ``model.named_modules()`` prints it), a
regex (``re.fullmatch`` over the names), an int (0-based) into the model's main block list,
or a list of these. Names resolve the same through DDP (``module.``) and ``torch.compile``
(``_orig_mod.``) wrappers. Depth 8 in the REPA paper is the output of the 8th block, which is
``blocks.7`` or ``layers=7``.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import ConfigError, HiddenDimError, LayerNotFoundError

LayerSpec = Union[int, str]
LayersLike = Union[LayerSpec, Sequence[LayerSpec]]

__all__ = [
    "unwrap_model",
    "strip_wrapper_prefixes",
    "find_block_list",
    "resolve_layers",
    "infer_model_dim",
    "infer_hidden_dim",
    "CaptureHook",
]

_WRAPPER_ATTRS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_WRAPPER_PREFIX = re.compile(r"(?:(?:module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.)")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DDP / DataParallel / torch.compile wrappers off ``model``."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            break
    return model


def strip_wrapper_prefixes(name: str) -> str:
    """``module._orig_mod.blocks.7`` -> ``blocks.7`` (also inside names, as wrappers nest)."""
    return _WRAPPER_PREFIX.sub("", name)


def _module_names(model: nn.Module) -> Dict[str, nn.Module]:
    """Canonical (wrapper-free) names -> modules, skipping the root and duplicate aliases."""
    names: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        canonical = strip_wrapper_prefixes(name)
        if canonical and canonical not in names:
            names[canonical] = module
    return names


def find_block_list(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The model's main block list: the longest ``nn.ModuleList`` whose children share one type.

    Ties go to the first in registration order (e.g. ``blocks``, ``layers``,
    ``transformer_blocks``). Raises :class:`LayerNotFoundError` when there is none.
    """
    best: Optional[Tuple[str, nn.ModuleList]] = None
    for name, module in _module_names(model).items():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) != 1:
                continue
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise LayerNotFoundError(
            f"an int in layers= indexes the model's block list, but {type(model).__name__} has no "
            "nn.ModuleList of same-type blocks; pass module names instead, e.g. layers='blocks.7'"
        )
    return best


def _closest(name: str, names: Sequence[str], n: int = 5) -> List[str]:
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.4)
    return close or list(names)[:n]


def _resolve_one(
    spec: LayerSpec, names: Dict[str, nn.Module], blocks: Optional[Sequence[str]], model: nn.Module
) -> List[str]:
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise ConfigError(f"layers entries must be ints or module names, got {spec!r} ({type(spec).__name__})")
    if isinstance(spec, int):
        if blocks is None:
            name, block_list = find_block_list(model)
            blocks = [f"{name}.{i}" for i in range(len(block_list))]
        if not -len(blocks) <= spec < len(blocks):
            raise LayerNotFoundError(
                f"layers={spec} is out of range for the model's {len(blocks)} blocks "
                f"({blocks[0]} .. {blocks[-1]}); use 0..{len(blocks) - 1} or negative ints from the end "
                "(REPA's depth 8 is layers=7)"
            )
        return [blocks[spec]]
    name = strip_wrapper_prefixes(spec)
    if name in names:
        return [name]
    try:
        pattern = re.compile(name)
    except re.error:
        pattern = None
    matched = [n for n in names if pattern is not None and pattern.fullmatch(n)]
    if matched:
        return matched
    raise LayerNotFoundError(
        f"layers={spec!r} matches no module of {type(model).__name__}; closest names: "
        f"{_closest(name, list(names))}. Use a name from model.named_modules(), a regex, or an int block index"
    )


def resolve_layers(
    model: nn.Module, layers: LayersLike, *, blocks: Optional[Sequence[str]] = None
) -> List[Tuple[str, nn.Module]]:
    """Resolve ``layers`` to an ordered, de-duplicated list of (canonical name, module).

    ``blocks`` optionally overrides the block list that ints index (model presets use this).
    """
    model = unwrap_model(model)
    names = _module_names(model)
    specs: List[LayerSpec] = list(layers) if isinstance(layers, (list, tuple)) else [layers]  # type: ignore[list-item]
    if not specs:
        raise ConfigError("layers= is empty; pass at least one layer, e.g. layers=7 or layers='blocks.7'")
    out: List[str] = []
    for spec in specs:
        for name in _resolve_one(spec, names, blocks, model):
            if name not in out:
                out.append(name)
    return [(name, names[name]) for name in out]


def infer_model_dim(module: nn.Module, name: str = "", arg: str = "model_dim") -> int:
    """Guess the width of a module's output from its parameters.

    Votes over the widths its layers touch (Linear in/out features, Conv in/out channels,
    norm shapes): in a transformer block the model width appears more often than the MLP or
    modulation widths, in a ResNet block the output channels do. An unclear vote raises
    :class:`HiddenDimError` naming ``arg``, the constructor argument that sets the width.
    """
    votes: Counter = Counter()
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            votes[sub.in_features] += 1
            votes[sub.out_features] += 1
        elif isinstance(sub, nn.modules.conv._ConvNd):
            votes[sub.in_channels] += 1
            votes[sub.out_channels] += 1
        elif isinstance(sub, (nn.LayerNorm, nn.RMSNorm)) and sub.normalized_shape:
            votes[int(sub.normalized_shape[-1])] += 1
        elif isinstance(sub, nn.GroupNorm):
            votes[sub.num_channels] += 1
        elif isinstance(sub, nn.modules.batchnorm._NormBase):
            votes[sub.num_features] += 1
        elif isinstance(sub, nn.Embedding):
            votes[sub.embedding_dim] += 1
    top = votes.most_common(2)
    if not top or (len(top) == 2 and top[0][1] == top[1][1]):
        where = f" {name!r}" if name else ""
        raise HiddenDimError(
            f"cannot infer the output width of layer{where} ({type(module).__name__}) from its parameters "
            f"(width votes: {dict(votes) or 'none'}); pass {arg}=<int> (or a dict layer -> int)"
        )
    return int(top[0][0])


#: the name of 0.1.0
infer_hidden_dim = infer_model_dim


class CaptureHook:
    """Forward hook that stores a module's output in a shared dict, keyed by layer name.

    Idempotent: a later firing overwrites the earlier capture. Nothing is stored while grad is
    disabled or the owner is disabled; firings during backward (activation-checkpoint
    recompute) are ignored. A deep copy of a model carrying this hook gets an inert hook, so an
    EMA copy's forward never overwrites the original's captures.
    """

    def __init__(self, name: str, owner: Any) -> None:
        self.name = name
        self.owner = owner
        self.active = True

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        owner = self.owner
        if not self.active or owner is None or not owner._capture_enabled:
            return
        if _in_backward():
            return
        if not torch.is_grad_enabled():
            owner._ran_without_grad.add(self.name)
            return
        owner._captures[self.name] = output

    def __deepcopy__(self, memo: Dict[int, Any]) -> CaptureHook:
        inert = CaptureHook(self.name, None)
        inert.active = False
        return inert

    def __reduce__(self):
        return (_inert_hook, (self.name,))


def _inert_hook(name: str) -> CaptureHook:
    hook = CaptureHook(name, None)
    hook.active = False
    return hook


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a non-reentrant checkpoint recompute)."""
    if torch.compiler.is_compiling():
        return False
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - older torch
        return False
