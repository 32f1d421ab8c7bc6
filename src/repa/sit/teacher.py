"""`repa teacher`: train ``fmnist-vit``, the small offline teacher encoder of the Fashion-MNIST demo.

REPA needs a frozen self-supervised encoder whose patch tokens the diffusion model aligns to.
No pretrained vision encoder can be downloaded offline, so the embedded default trains its own:
the registry's ``fmnist-vit`` (a 1-channel ViT, patch 4 -> 7x7 tokens at 28 px) trained on the
Fashion-MNIST training set in minutes on CPU, then saved where ``create_encoder("fmnist-vit")``
finds it (``$REPA_HOME/encoders/fmnist-vit.safetensors``).

Objectives (``--objective``):

- ``simclr-nn`` (default, self-supervised): SimCLR's NT-Xent on the mean-pooled tokens of two
  augmented views, where the second view comes, half of the time, from one of the image's 5
  nearest training neighbours in raw pixel space (nearest-neighbour positives as in NNCLR, with
  the support set fixed in pixel space). Plus a dense term that shapes the PATCH tokens, which
  are what REPA aligns to: the two views' token maps are put in correspondence through the
  known crop geometry, and each token must pick its counterpart out of all tokens of the same
  image (a per-image InfoNCE over the 7x7 grid).
- ``simclr``: the same without neighbour positives (plain SimCLR + the dense term).
- ``supervised``: cross-entropy of a linear head on the pooled tokens (uses the labels; a
  reference point, not self-supervised).

The package ships weights at ``repa/encoders/assets/fmnist-vit.safetensors`` (with the record
of the run that produced them, objective included, in ``fmnist-vit.json`` beside them); a file
in ``$REPA_HOME/encoders/`` takes precedence, so retraining never touches the package.

The quality measure is a k-nearest-neighbour classifier (k = 20, cosine similarity, votes
weighted by similarity) on mean-pooled patch tokens, the training set as the memory bank and
the test set as queries; raw pixels are measured the same way for comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write_text
from ..errors import ConfigError, DataNotFoundError
from .teacher_objectives import (  # noqa: F401  (re-exported: the objectives' old import path)
    DEFAULT_DENSE_WEIGHT,
    OBJECTIVES,
    TeacherHeads,
    _dense_nce,
    _nt_xent,
    _trunk_tokens,
    _view_to_view_grid,
    augment,
    teacher_loss,
)

__all__ = [
    "OBJECTIVES",
    "DEFAULT_OBJECTIVE",
    "TeacherResult",
    "augment",
    "knn_accuracy",
    "pooled_features",
    "pixel_neighbours",
    "TeacherHeads",
    "teacher_loss",
    "train_teacher",
    "save_teacher",
    "ensure_teacher",
    "add_arguments",
    "main",
]

_log = logging.getLogger("repa")

ENCODER_NAME = "fmnist-vit"
DEFAULT_OBJECTIVE = "simclr-nn"
DEFAULT_MINUTES = 10.0
DEFAULT_BATCH_SIZE = 256
DEFAULT_LR = 2e-3
KNN_K = 20
PathLike = Union[str, "os.PathLike[str]"]


class TeacherResult(NamedTuple):
    """What :func:`train_teacher` returns.

    Attributes:
        encoder: the trained ``fmnist-vit`` as a frozen encoder (eval mode, no gradients).
        knn_accuracy: its kNN test accuracy (None when evaluation was skipped).
        record: everything worth keeping beside the weights (objective, epochs, steps, seed,
            losses, seconds, pixel kNN accuracy, ...), JSON-serializable.
    """

    encoder: nn.Module
    knn_accuracy: Optional[float]
    record: Dict[str, Any]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _load_split(data: Optional[PathLike], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, 28, 28) and int64 labels (N,) of Fashion-MNIST's ``split``."""
    from .data import FASHION_MNIST_DIR, load_idx_split

    root = Path(os.path.expanduser(str(data))) if data is not None else Path(FASHION_MNIST_DIR)
    if not root.is_dir():
        raise DataNotFoundError(
            f"Fashion-MNIST folder {str(root)!r} does not exist; install the data with `apt-get install -y "
            "dataset-fashion-mnist` or pass --data DIR holding the IDX files (train-images-idx3-ubyte.gz ...)"
        )
    images, labels = load_idx_split(root, split)
    return torch.from_numpy(images), torch.from_numpy(labels)  # (N, 1, H, W) uint8, (N,) int64


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = KNN_K,
    *,
    num_classes: Optional[int] = None,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of a cosine k-nearest-neighbour classifier.

    Each test vector takes the ``k`` training vectors of highest cosine similarity; each
    neighbour votes for its label with weight equal to its similarity; the label with the
    largest total wins (ties: the smallest label). Features (n, d), labels (n,).
    """
    if k < 1 or k > train_feats.shape[0]:
        raise ConfigError(f"k must be in [1, {train_feats.shape[0]}] (the memory bank size), got {k}")
    c = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    bank = F.normalize(train_feats.float(), dim=-1)  # (n_train, d)
    labels = train_labels.long()
    correct = 0
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start : start + chunk].float(), dim=-1)  # (m, d)
        sim, idx = (q @ bank.t()).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(q.shape[0], c).scatter_add_(1, labels[idx], sim)  # (m, C)
        correct += int((votes.argmax(1) == test_labels[start : start + chunk].long()).sum())
    return correct / test_feats.shape[0]


@torch.no_grad()
def pooled_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 1000, progress: bool = False) -> torch.Tensor:
    """Mean-pooled patch tokens (N, D) of uint8 images (N, C, H, W) through a frozen encoder."""
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc="features", unit="batch", disable=not progress, leave=False):
        out.append(encoder(images[start : start + batch_size]).mean(1))  # (b, D)
    return torch.cat(out)


@torch.no_grad()
def pixel_neighbours(images: torch.Tensor, k: int = 5, dims: int = 64, chunk: int = 2048, seed: int = 0) -> torch.Tensor:
    """Indices (N, k) of each image's ``k`` nearest other images by cosine similarity of raw pixels.

    Pixels are first projected onto their top ``dims`` principal components (the cosine ranking
    barely changes and the search gets 12x cheaper).
    """
    x = images.flatten(1).float() / 255.0  # (N, P)
    mean = x.mean(0, keepdim=True)
    torch.manual_seed(seed)
    _, _, v = torch.pca_lowrank(x - mean, q=min(dims, *x.shape), center=False, niter=3)
    z = F.normalize(x @ v, dim=-1)  # (N, dims): uncentred projection keeps the pixel cosine geometry
    out = torch.empty(x.shape[0], k, dtype=torch.long)
    for start in range(0, x.shape[0], chunk):
        sim = z[start : start + chunk] @ z.t()  # (m, N)
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = float("-inf")  # not itself
        out[start : start + chunk] = sim.topk(k, dim=1).indices
    return out


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _check_budget(objective: str, epochs: Optional[float], minutes: Optional[float], batch_size: int) -> Optional[float]:
    """Validate the objective and the training budget; returns ``minutes`` (the default budget when neither is given)."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if epochs is not None and minutes is not None:
        raise ConfigError(f"pass epochs or minutes, not both (got epochs={epochs!r}, minutes={minutes!r})")
    if epochs is None and minutes is None:
        minutes = DEFAULT_MINUTES
    if epochs is not None and not epochs > 0:
        raise ConfigError(f"epochs must be > 0, got {epochs!r}")
    if minutes is not None and not minutes > 0:
        raise ConfigError(f"minutes must be > 0, got {minutes!r}")
    if batch_size < 2:
        raise ConfigError(f"batch_size must be at least 2 (contrastive pairs), got {batch_size}")
    return minutes


def _init_record(init: Optional[PathLike]) -> Optional[Dict[str, Any]]:
    """Check a warm-start weights file and describe it for the record (name, SHA-256, its own record)."""
    if init is None:
        return None
    import hashlib

    path = Path(init).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"init weights {str(path)!r} not found; pass a .safetensors file saved by 'repa teacher'")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out: Dict[str, Any] = {"file": path.name, "sha256": digest}
    own = path.with_suffix(".json")
    if own.is_file():
        try:
            prior = json.loads(own.read_text())
            out.update({k: prior[k] for k in ("objective", "epochs", "knn_accuracy") if k in prior})
        except (OSError, ValueError):
            pass
    return out


def _round_weights(encoder: nn.Module, weights_dtype: Optional[torch.dtype]) -> None:
    """Freeze the encoder and round its weights to the stored dtype (the accuracy reported is the file's)."""
    encoder.model.requires_grad_(False).eval()
    if weights_dtype is not None:
        with torch.no_grad():
            for t in list(encoder.model.parameters()) + list(encoder.model.buffers()):
                if t.is_floating_point():
                    t.copy_(t.to(weights_dtype).float())


def _evaluate(
    encoder: nn.Module, data: Optional[PathLike], images: torch.Tensor, labels: torch.Tensor,
    eval_limit: Optional[int], pixel_baseline: bool, progress: bool, record: Dict[str, Any],
) -> float:
    """kNN accuracy of the pooled features on the test split (and of raw pixels); written into ``record``."""
    n = images.shape[0]
    test_images, test_labels = _load_split(data, "test")
    if eval_limit is not None:
        test_images, test_labels = test_images[:eval_limit], test_labels[:eval_limit]
    k = min(KNN_K, n)
    bank = pooled_features(encoder, images, progress=progress)  # (N, D)
    query = pooled_features(encoder, test_images, progress=progress)  # (M, D)
    acc = knn_accuracy(bank, labels, query, test_labels, k)
    record.update(knn_accuracy=acc, knn={"k": k, "metric": "cosine", "vote": "similarity-weighted",
                  "features": "mean of the patch tokens", "memory": f"train ({n})", "queries": f"test ({test_images.shape[0]})"})
    if pixel_baseline:
        record["pixel_knn_accuracy"] = knn_accuracy(
            images.flatten(1).float(), labels, test_images.flatten(1).float(), test_labels, k
        )
    return acc


def _teacher_loop(
    objective: str, encoder: nn.Module, heads: nn.Module, opt: torch.optim.Optimizer, params: List[torch.Tensor],
    images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, nn_index: Optional[torch.Tensor], *,
    total: int, warmup: int, minutes: Optional[float], max_steps: Optional[int], batch_size: int, lr: float,
    neighbours: int, dense_weight: float, progress: bool,
) -> Tuple[List[float], int, float]:
    """The teacher's optimizer steps (cosine schedule; with ``minutes`` its length is fixed after 10 timed steps).

    Returns the per-step losses, the number of steps and the training seconds.
    """
    from tqdm.auto import tqdm

    n = images.shape[0]
    losses: List[float] = []
    start_time = time.perf_counter()
    calibrate_at = 10
    bar = tqdm(total=total if minutes is None else None, desc=f"teacher ({objective})", unit="step", disable=not progress, dynamic_ncols=True)
    step, order, cursor = 0, torch.randperm(n, generator=gen), 0
    while step < total:
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        partners = None
        if nn_index is not None:
            pick = nn_index[idx, torch.randint(neighbours, (idx.shape[0],), generator=gen)]  # (B,)
            use = torch.rand(idx.shape[0], generator=gen) < 0.5
            partners = images[torch.where(use, pick, idx)]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total, lr, warmup)
        loss = teacher_loss(
            objective, encoder, heads, images[idx], labels[idx], gen, partners=partners, dense_weight=dense_weight
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if minutes is not None and step == calibrate_at:
            per_step = (time.perf_counter() - start_time) / step
            total = max(step + 1, int(minutes * 60 / per_step))
            if max_steps is not None:
                total = min(total, max_steps)
            warmup = _warmup(total)
            bar.total = total
        bar.update(1)
        if step % 10 == 0 or step == total:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
    bar.close()
    train_seconds = time.perf_counter() - start_time
    return losses, step, train_seconds


def _warmup(total: int) -> int:
    """Warm-up steps of a ``total``-step run: a tenth of it, at least 1, at most 300."""
    return max(1, min(300, total // 10))


def _schedule(n: int, batch_size: int, epochs: Optional[float], max_steps: Optional[int]) -> Tuple[int, int, int]:
    """Steps per epoch, total steps (``epochs`` of them, 1 epoch when training by minutes: re-set
    after the timed steps) and warm-up steps (:func:`_warmup`)."""
    steps_per_epoch = max(1, n // batch_size)
    total = max(1, int(round((epochs if epochs is not None else 1.0) * steps_per_epoch)))
    if max_steps is not None:
        total = min(total, max_steps)
    return steps_per_epoch, total, _warmup(total)


def _optimizer(encoder: nn.Module, heads: nn.Module, lr: float, weight_decay: float
               ) -> Tuple[List[nn.Parameter], torch.optim.Optimizer]:
    """AdamW over the trunk and the heads; no weight decay on biases and norms (1-D parameters)."""
    params = [p for p in list(encoder.model.parameters()) + list(heads.parameters()) if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return params, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def train_teacher(
    data: Optional[PathLike] = None,
    *,
    objective: str = DEFAULT_OBJECTIVE,
    epochs: Optional[float] = None,
    minutes: Optional[float] = None,
    max_steps: Optional[int] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    weight_decay: float = 0.05,
    dense_weight: float = DEFAULT_DENSE_WEIGHT,
    neighbours: int = 5,
    seed: int = 0,
    train_limit: Optional[int] = None,
    evaluate: bool = True,
    eval_limit: Optional[int] = None,
    pixel_baseline: bool = True,
    weights_dtype: Optional[torch.dtype] = torch.float16,
    progress: bool = True,
    encoder_kwargs: Optional[Dict[str, Any]] = None,
    init: Optional[PathLike] = None,
) -> TeacherResult:
    """Train ``fmnist-vit`` on Fashion-MNIST and measure its kNN accuracy.

    Args:
        data: folder of the IDX files (default: the Debian package's folder).
        objective: ``"simclr-nn"`` (default), ``"simclr"`` or ``"supervised"`` (see the module doc).
        epochs: passes over the training set; sets the learning-rate schedule's length
            (reproducible step count).
        minutes: instead of ``epochs``, a wall-clock budget: the step count is fixed after
            timing the first steps so the cosine schedule ends on time. With neither given,
            ``minutes`` is :data:`DEFAULT_MINUTES`.
        max_steps: hard cap on optimizer steps (tests).
        train_limit / eval_limit: use only the first N training / test images (tests).
        weights_dtype: the dtype the weights will be stored in; the trained weights are
            rounded to it before evaluation, so the reported accuracy is that of the file.
        encoder_kwargs: extra keywords for ``create_encoder("fmnist-vit", ...)`` (e.g. ``depth=1``).
        init: a weights file (``.safetensors``) to start from instead of random weights: training
            continues a saved teacher (a longer run, or supervised fine-tuning of a
            self-supervised one) with fresh heads, optimizer and learning-rate schedule. The
            record keeps the file's name and SHA-256.

    Returns:
        :class:`TeacherResult` ``(encoder, knn_accuracy, record)``.
    """
    from ..encoders import create_encoder

    minutes = _check_budget(objective, epochs, minutes, batch_size)

    images, labels = _load_split(data, "train")
    if train_limit is not None:
        images, labels = images[:train_limit], labels[:train_limit]
    n = images.shape[0]
    batch_size = min(batch_size, n)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    init_record = _init_record(init)
    encoder = create_encoder(ENCODER_NAME, pretrained=False, resolution=images.shape[-1],
                             weights=init, **(encoder_kwargs or {}))
    encoder.model.float().requires_grad_(True).train()
    heads = TeacherHeads(encoder.embed_dim, num_classes=int(labels.max()) + 1)
    params, opt = _optimizer(encoder, heads, lr, weight_decay)
    steps_per_epoch, total, warmup = _schedule(n, batch_size, epochs, max_steps)
    nn_index = pixel_neighbours(images, k=neighbours, seed=seed) if objective == "simclr-nn" else None

    losses, step, train_seconds = _teacher_loop(
        objective, encoder, heads, opt, params, images, labels, gen, nn_index,
        total=total, warmup=warmup, minutes=minutes, max_steps=max_steps, batch_size=batch_size, lr=lr,
        neighbours=neighbours, dense_weight=dense_weight, progress=progress,
    )

    _round_weights(encoder, weights_dtype)

    record: Dict[str, Any] = {
        "encoder": ENCODER_NAME,
        "objective": objective,
        "self_supervised": objective != "supervised",
        "epochs": round(step / steps_per_epoch, 3),
        "steps": step,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "dense_weight": dense_weight if objective != "supervised" else 0.0,
        "seed": seed,
        "train_images": n,
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "first_loss": losses[0],
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "losses": losses,
        "weights_dtype": str(weights_dtype).replace("torch.", "") if weights_dtype is not None else "float32",
        "encoder_kwargs": dict(encoder_kwargs or {}),
    }
    if init_record is not None:
        record["init"] = init_record
    acc = _evaluate(encoder, data, images, labels, eval_limit, pixel_baseline, progress, record) if evaluate else None
    return TeacherResult(encoder, acc, record)


# --------------------------------------------------------------------------------------------
# saving, and the demo's entry point
# --------------------------------------------------------------------------------------------


def save_teacher(result: TeacherResult, path: Optional[PathLike] = None, command: Optional[str] = None) -> Path:
    """Write the weights (atomically, in ``record["weights_dtype"]``) and ``<path>.json`` beside them."""
    import copy

    from ..encoders import local_weights_path, save_encoder_weights

    path = Path(path).expanduser() if path is not None else local_weights_path(ENCODER_NAME)
    model = copy.deepcopy(result.encoder.model)
    dtype = getattr(torch, result.record.get("weights_dtype", "float32"))
    model.to(dtype)
    save_encoder_weights(model, path)
    record = {k: v for k, v in result.record.items() if k != "losses"}
    record["command"] = command
    record["weights_file"] = path.name
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return path


def ensure_teacher(data: Optional[PathLike] = None, quiet: bool = False) -> Path:
    """The weights file ``create_encoder("fmnist-vit")`` loads; trained (default settings) if there is none.

    Looks in ``$REPA_HOME/encoders/`` then at the file shipped with the package; only when
    neither exists does it train (a few minutes on CPU) and save to
    :func:`~repa.encoders.local_weights_path`.
    """
    from ..encoders import get_encoder_spec, locate_weights

    found, _ = locate_weights(get_encoder_spec(ENCODER_NAME))
    if found is not None:
        return found
    if not quiet:
        _log.info("no weights for %r yet: training it once (repa teacher, a few minutes on CPU)", ENCODER_NAME)
    result = train_teacher(data, progress=not quiet)
    path = save_teacher(result, command=_command_line(data=data))
    if not quiet:
        _log.info("%s", _report(result, path))
    return path


def _command_line(**parts: Any) -> str:
    words = ["repa", "teacher"]
    for key, value in parts.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def _report(result: TeacherResult, path: Path) -> str:
    """The teacher's summary: objective, steps, kNN accuracy beside raw pixels', where it was saved."""
    r = result.record
    lines = [f"teacher {ENCODER_NAME}: objective {r['objective']}"
             f" ({'self-supervised' if r['self_supervised'] else 'SUPERVISED, uses labels'}),"
             f" {r['steps']} steps ({r['epochs']} epochs) in {r['train_seconds']:.0f} s"]
    if result.knn_accuracy is not None:
        lines.append(f"  kNN accuracy (k={r['knn']['k']}, cosine, pooled patch tokens): {result.knn_accuracy:.4f}")
    if "pixel_knn_accuracy" in r:
        lines.append(f"  kNN accuracy of raw pixels, same protocol:             {r['pixel_knn_accuracy']:.4f}")
    lines.append(f"  weights: {path}  (record: {path.with_suffix('.json')})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``repa teacher``."""
    parser.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                        help=f"training objective (default: {DEFAULT_OBJECTIVE}, self-supervised; 'supervised' uses the labels)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, default=None, help="passes over the training set (a reproducible step count)")
    budget.add_argument("--minutes", type=float, default=None,
                        help=f"train for about this many minutes (default: {DEFAULT_MINUTES:g} when --epochs is not given)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak AdamW learning rate (warmup, then cosine decay)")
    parser.add_argument("--dense-weight", type=float, default=DEFAULT_DENSE_WEIGHT,
                        help="weight of the patch-token (dense) term of the SSL objectives (0 disables it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", default=None, metavar="FILE",
                        help="start from these weights (.safetensors, e.g. a saved teacher) instead of random ones")
    parser.add_argument("--out", default=None, help="weights file to write (default: $REPA_HOME/encoders/fmnist-vit.safetensors)")
    parser.add_argument("--fp32", action="store_true", help="store float32 weights (default: float16, half the size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Train the teacher, report its kNN accuracy beside raw pixels', save weights + JSON record."""
    result = train_teacher(
        args.data,
        objective=args.objective,
        epochs=args.epochs,
        minutes=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        dense_weight=args.dense_weight,
        seed=args.seed,
        weights_dtype=torch.float32 if args.fp32 else torch.float16,
        progress=not args.no_progress,
        init=args.init,
    )
    command = _command_line(
        data=args.data, objective=args.objective, epochs=args.epochs, minutes=args.minutes,
        batch_size=args.batch_size if args.batch_size != DEFAULT_BATCH_SIZE else None,
        lr=args.lr if args.lr != DEFAULT_LR else None,
        dense_weight=args.dense_weight if args.dense_weight != DEFAULT_DENSE_WEIGHT else None,
        seed=args.seed, init=args.init, out=args.out, fp32=args.fp32,
    )
    path = save_teacher(result, args.out, command=command)
    print(_report(result, path))  # the command's result, on stdout
    pixels = result.record.get("pixel_knn_accuracy")
    if pixels is not None and result.knn_accuracy is not None and result.knn_accuracy <= pixels:
        _log.warning("the teacher does not beat raw pixels (%.4f <= %.4f); train longer (--epochs) or try another "
                     "--objective", result.knn_accuracy, pixels)
    return 0
