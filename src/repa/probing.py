"""Layer-wise alignment of any model with a frozen encoder: CKNNA and linear probes per layer and t.

REPA's alignment analysis (REPA_FACTS section 7): for n images x with labels, and a noise level
t, run the diffusion model on x_t = alpha(t) x + sigma(t) eps, average each hooked block's
output over its tokens, and compare with the encoder's token-averaged features of the clean
images by CKNNA (k = 10). A linear probe on the same averaged hidden states (MAE protocol,
train/test split of the n samples) measures how much class information each layer holds; the
encoder's own probe accuracy is the reference.

A tool: works on any ``nn.Module`` and any encoder callable, imports nothing of the SiT recipe
(``repa probe`` on a training checkpoint lives in :mod:`repa.sit.probe`)::

    result = probe_alignment(model, encoder, images, labels, layers="all", ts=[0.5])
    result.cknna[t_index][layer_index], result.linear_probe[...], result.encoder_probe
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ._io import atomic_write
from .errors import ConfigError, ShapeMismatchError, require
from .metrics import cknna, linear_probe

__all__ = ["AlignmentResult", "probe_alignment", "plot_alignment", "resolve_probe_layers", "PROBE_PATHS"]

LayersArg = Union[str, int, Sequence[Union[int, str]]]


@dataclass
class AlignmentResult:
    """Alignment of a model's layers with an encoder, per noise level.

    Attributes:
        layers: the probed module names, in order (``"blocks.0"``, ...).
        ts: the noise levels t (t = 1 is pure noise on the linear path).
        cknna: ``cknna[i][j]``: CKNNA between layer j's token-averaged hidden states at ts[i]
            and the encoder's token-averaged features.
        linear_probe: ``linear_probe[i][j]``: top-1 test accuracy of a linear probe on layer j at
            ts[i] (``None`` without labels).
        encoder_probe: the encoder's own linear-probe accuracy on the same split (``None`` without labels).
        num_samples, num_train, topk, seed: how it was measured.
        meta: anything the caller adds (checkpoint, encoder name, ...), written to the JSON.
    """

    layers: List[str]
    ts: List[float]
    cknna: List[List[float]]
    linear_probe: Optional[List[List[float]]]
    encoder_probe: Optional[float]
    num_samples: int
    num_train: int
    topk: int
    seed: int
    meta: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (also with ``depth``: the paper's 1-based block numbers where names end in an index)."""
        return {
            **self.meta,
            "layers": self.layers,
            "depth": [_depth(name, j) for j, name in enumerate(self.layers)],
            "ts": self.ts,
            "cknna": self.cknna,
            "linear_probe": self.linear_probe,
            "encoder_probe": self.encoder_probe,
            "num_samples": self.num_samples,
            "num_train": self.num_train,
            "topk": self.topk,
            "seed": self.seed,
        }


def _depth(name: str, position: int) -> int:
    """``blocks.7`` -> 8 (REPA's 1-based encoder depth); names without an index -> position + 1."""
    tail = name.rsplit(".", 1)[-1]
    return int(tail) + 1 if tail.isdigit() else position + 1


def resolve_probe_layers(model: nn.Module, layers: LayersArg) -> List[Tuple[str, nn.Module]]:
    """``"all"`` (every block of the model's block list), ``"0,3,5"`` (block indices), names, regexes or ints."""
    from .capture import find_block_list, resolve_layers

    if isinstance(layers, str):
        text = layers.strip()
        if text == "all":
            name, blocks = find_block_list(model)
            return [(f"{name}.{i}", block) for i, block in enumerate(blocks)]
        parts = [p.strip() for p in text.split(",") if p.strip()]
        layers = [int(p) if p.lstrip("-").isdigit() else p for p in parts]
    return resolve_layers(model, layers)


def _pool(output: Any, name: str) -> torch.Tensor:
    """A hooked output -> its token average (B, D): tokens (B, N, D) or a map (B, C, H, W)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.ndim not in (3, 4):
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ShapeMismatchError(f"layer {name!r} must output tokens (B, N, D) or a map (B, C, H, W) to be probed, got {got}")
    return output.float().mean(dim=1) if output.ndim == 3 else output.float().mean(dim=(2, 3))


def _default_forward(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> Any:
    """The model on x_t at t with the null class label (``num_classes``) when it is class-conditional."""
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        return model(x_t, t)
    y = torch.full((x_t.shape[0],), int(num_classes), dtype=torch.long, device=x_t.device)  # (B,) null label
    return model(x_t, t, y)


#: The noise paths of :func:`probe_alignment` by name: t -> (alpha(t), sigma(t)) (SiT's definitions:
#: the linear path x_t = (1 - t) x + t eps, the cosine path cos / sin of pi t / 2).
PROBE_PATHS: Dict[str, Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = {
    "linear": lambda t: (1 - t, t),
    "cosine": lambda t: (torch.cos(t * (math.pi / 2)), torch.sin(t * (math.pi / 2))),
}


def _interpolation(path: Any) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``x_t(x, eps, t)`` for a path name of :data:`PROBE_PATHS` or an object with ``interpolate(x, eps, t)``."""
    if hasattr(path, "interpolate"):  # e.g. a repa.sit.transport.Path
        return lambda x, eps, t: path.interpolate(x, eps, t)[0]
    if path not in PROBE_PATHS:
        raise ConfigError(f"unknown path {path!r}; valid paths are {', '.join(PROBE_PATHS)} (or an object with .interpolate)")
    coeffs = PROBE_PATHS[path]

    def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = coeffs(t.view(-1, *([1] * (x.ndim - 1))))  # (B, 1, ...) each
        return alpha * x + sigma * eps

    return interpolate


def _check_probe_inputs(
    images: torch.Tensor, inputs: Optional[torch.Tensor], labels: Any, ts: Sequence[float], train_fraction: float, topk: int
) -> Tuple[int, torch.Tensor, List[float], Optional[torch.Tensor]]:
    """Validate :func:`probe_alignment`'s inputs: (n, the model's clean input x0, the ts, the labels (n,) or None)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ShapeMismatchError(
            f"images must be a tensor (n, C, H, W), got {tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
        )
    n = images.shape[0]
    x0 = inputs if inputs is not None else images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float() * 2 - 1
    if x0.shape[0] != n:
        raise ShapeMismatchError(f"inputs has {x0.shape[0]} samples but images has {n}; pass the same samples")
    ts = [float(t) for t in ts]
    if not ts or any(not 0.0 <= t <= 1.0 for t in ts):
        raise ConfigError(f"ts must be noise levels in [0, 1], got {ts}")
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    if n <= topk:
        raise ConfigError(f"CKNNA with topk={topk} needs more than {topk} samples, got {n}; pass more images or a smaller topk")
    y = None
    if labels is not None:
        y = torch.as_tensor(np.asarray(labels)).long().view(-1)  # (n,)
        if y.shape[0] != n:
            raise ShapeMismatchError(f"labels has {y.shape[0]} entries for {n} images")
    return n, x0, ts, y


def _encoder_features(encoder: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, dev: torch.device,
                      batch_size: int) -> torch.Tensor:
    """The encoder's token-averaged features of the clean images, float64 on the CPU: (n, D_e)."""
    n = images.shape[0]
    enc_feats = []
    for s in range(0, n, batch_size):
        tokens = encoder(images[s : s + batch_size].to(dev))  # (B, N, D)
        enc_feats.append(_pool(tokens, "encoder").double().cpu())
    enc = torch.cat(enc_feats)  # (n, D_e)

    return enc


def _hidden_states(
    model: nn.Module, resolved: List[Tuple[str, nn.Module]], x0: torch.Tensor, eps: torch.Tensor, ts: List[float],
    interpolate: Callable[..., torch.Tensor], forward: Callable[..., Any], dev: torch.device, batch_size: int,
    progress: bool,
) -> Dict[Tuple[int, str], List[torch.Tensor]]:
    """Run the model on x_t at every t with hooks on the layers: {(t index, layer): [(B, D) token averages]}."""
    n, names = x0.shape[0], [name for name, _ in resolved]
    captured: Dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda mod, args, out, _name=name: captured.__setitem__(_name, _pool(out, _name)))
        for name, module in resolved
    ]
    was_training = model.training
    model.eval()
    hidden: Dict[Tuple[int, str], List[torch.Tensor]] = {}
    try:
        from tqdm.auto import tqdm

        steps = [(i, s) for i in range(len(ts)) for s in range(0, n, batch_size)]
        for i, s in tqdm(steps, desc="probe", unit="batch", disable=not progress):
            xb = x0[s : s + batch_size].to(dev)
            tb = torch.full((xb.shape[0],), ts[i], device=dev)  # (B,)
            x_t = interpolate(xb, eps[s : s + batch_size].to(dev), tb)
            captured.clear()
            forward(model, x_t, tb)
            for name in names:
                if name not in captured:
                    raise ConfigError(f"layer {name!r} did not run during the model's forward; probe layers the forward uses")
                hidden.setdefault((i, name), []).append(captured[name].double().cpu())  # (B, D)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    return hidden


@torch.no_grad()
def probe_alignment(
    model: nn.Module,
    encoder: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: Optional[Union[torch.Tensor, np.ndarray, Sequence[int]]],
    layers: LayersArg = "all",
    ts: Sequence[float] = (0.5,),
    *,
    inputs: Optional[torch.Tensor] = None,
    path: str = "linear",
    forward: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor], Any]] = None,
    topk: int = 10,
    batch_size: int = 64,
    train_fraction: float = 0.8,
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    probe_kwargs: Optional[Dict[str, Any]] = None,
    progress: bool = False,
) -> AlignmentResult:
    """Per layer and noise level: CKNNA with the encoder and linear-probe accuracy (REPA's analysis).

    Args:
        model: the diffusion model (eval mode is set for the measurement and restored).
        encoder: images (B, C, H, W) -> tokens (B, N, D) (a registry encoder or any callable).
        images: the clean images (n, C, H, W), uint8 0-255 (or float in [0, 1]), the encoder's input.
        labels: (n,) class ids for the linear probes, or ``None`` to skip them.
        layers: ``"all"`` blocks, ``"0,3,5"``, or anything ``REPARegularizer(layers=...)`` takes.
        ts: noise levels; x_t = alpha(t) x + sigma(t) eps on ``path`` (``"linear"``: t = 1 is noise).
        inputs: the model's clean input x (n, ...) when it is not the pixels (e.g. SD-VAE
            latents); default ``images`` scaled to [-1, 1].
        forward: ``forward(model, x_t, t)``; default passes the null class label
            ``model.num_classes`` when the model has that attribute, as REPA's analysis does.
        topk: k of CKNNA (REPA: 10).
        train_fraction: share of the samples that trains the probes (a seeded split); the rest tests.
        seed: seed of the noise eps (the same eps at every t) and of the split.
        probe_kwargs: extra keywords for :func:`repa.metrics.linear_probe`.

    The noise is drawn once per sample, so the curves of different t differ only by t.
    """
    n, x0, ts, y = _check_probe_inputs(images, inputs, labels, ts, train_fraction, topk)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    interpolate = _interpolation(path)
    resolved = resolve_probe_layers(model, layers)
    names = [name for name, _ in resolved]
    forward = forward or _default_forward

    enc = _encoder_features(encoder, images, dev, batch_size)  # (n, D_e)

    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)  # (n, ...) one draw per sample, reused at every t
    hidden = _hidden_states(model, resolved, x0, eps, ts, interpolate, forward, dev, batch_size, progress)

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_train = int(round(train_fraction * n))
    if not 0 < n_train < n:
        raise ConfigError(f"{n} samples with train_fraction={train_fraction} leave an empty train or test split")
    tr, te = perm[:n_train], perm[n_train:]
    kw = dict(probe_kwargs or {})
    if y is not None:
        kw.setdefault("num_classes", int(y.max()) + 1)

    def probe(feats: torch.Tensor) -> Optional[float]:
        if y is None:
            return None
        return float(linear_probe(feats[tr], y[tr], feats[te], y[te], **kw))

    table_cknna, table_probe = [], []
    for i in range(len(ts)):
        row_c, row_p = [], []
        for name in names:
            h = torch.cat(hidden[(i, name)])  # (n, D)
            row_c.append(float(cknna(h, enc, topk=topk)))
            row_p.append(probe(h))
        table_cknna.append(row_c)
        table_probe.append(row_p)
    return AlignmentResult(
        layers=names,
        ts=ts,
        cknna=table_cknna,
        linear_probe=table_probe if y is not None else None,
        encoder_probe=probe(enc),
        num_samples=n,
        num_train=n_train,
        topk=topk,
        seed=seed,
    )


def plot_alignment(result: Union[AlignmentResult, Dict[str, Any]], path: Union[str, os.PathLike[str]]) -> Path:
    """Write a PNG: CKNNA against layer depth (one line per t) and, with labels, probe accuracy beside it.

    Uses matplotlib's object API (no pyplot, no global backend change); written atomically.
    """
    require("matplotlib", "plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = result.to_dict() if isinstance(result, AlignmentResult) else result
    depth, ts = d["depth"], d["ts"]
    panels = 2 if d.get("linear_probe") else 1
    fig = Figure(figsize=(5.0 * panels, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, panels, 1)
    for t, row in zip(ts, d["cknna"]):
        ax.plot(depth, row, marker="o", label=f"t = {t:g}")
    ax.set_xlabel("layer (1-based block depth)")
    ax.set_ylabel(f"CKNNA (k = {d['topk']})")
    ax.set_title(f"alignment with {d.get('encoder', 'the encoder')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if panels == 2:
        bx = fig.add_subplot(1, panels, 2)
        for t, row in zip(ts, d["linear_probe"]):
            bx.plot(depth, row, marker="o", label=f"t = {t:g}")
        if d.get("encoder_probe") is not None:
            bx.axhline(d["encoder_probe"], color="gray", linestyle="--", label="encoder")
        bx.set_xlabel("layer (1-based block depth)")
        bx.set_ylabel("linear-probe top-1 accuracy")
        bx.grid(alpha=0.3)
        bx.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), fsync=False)
