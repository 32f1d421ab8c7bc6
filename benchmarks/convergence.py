"""REPA's benefit at toy scale: Frechet distance against training steps on Fashion-MNIST.

    python benchmarks/convergence.py --quick      # 1 seed, 200 steps: 6.9 minutes on 2 CPU cores
    python benchmarks/convergence.py              # 3 seeds, 600 steps: the full mode (51 minutes on 2 cores)
    python benchmarks/convergence.py --tiny       # seconds: the test suite's smoke run

Four arms train the same pixel-space SiT (``SiT-T/4``: depth 6, width 128, patch 4 -> 7x7
tokens on 28x28 images) on the same seeds, data order, noise and number of steps:

- ``vanilla``: the velocity loss alone;
- ``repa``: plus REPA's alignment of block ``--encoder-depth`` (2) to the ``fmnist-vit`` teacher
  (the registry's Fashion-MNIST ViT, loaded from its local weights), through the public
  :class:`repa.REPARegularizer` with targets precomputed once (``reg(features=...)``: REPA uses
  no augmentation, so cached targets are exact), weight ``--proj-coeff`` 4 and a 128-wide
  projector (the best of ``convergence_sweep.py`` at this scale; the paper's 0.5 gains less here);
- ``repa-stop``: the same with a ``stop_at`` schedule (HASTE) at ``--stop-at`` of the run;
- ``random-teacher``: the control, REPA towards a randomly initialized ``fmnist-vit`` (does the
  gain come from good features or from any extra target?).

Encoder-free arms, chosen with ``--arms`` (e.g. ``--arms vanilla,repa,dispersive,sra,repa-dispersive``):

- ``dispersive``: :class:`repa.DispersiveRegularizer` (arXiv 2506.09027) at the paper's defaults:
  InfoNCE-L2, weight 0.5, temperature 0.5, block depth // 4 (``blocks.0`` of 6);
- ``sra``: :class:`repa.SelfAlignmentRegularizer` (arXiv 2505.02831): block 2 aligned with the
  EMA model's block 4 at t - U(0, 0.2), smooth-L1 (beta 0.05), weight 0.2;
- ``repa-dispersive``: the ``repa`` arm plus the ``dispersive`` term.

The evaluator is independent of the teacher: a small CNN classifier trained here on the labels
(its test accuracy is reported), whose 128-d penultimate features define the Frechet distance
(FD) between ``--samples`` class-balanced samples of the EMA model and the whole test set. The
real-vs-real floor (the same number of training images against the test set) is printed beside
it. Every arm is scored with the same sampler, noise and labels; the protocol never changes per
arm.

Reported: FD against steps for each arm (mean and spread over seeds), the steps each REPA arm
needs to reach vanilla's final FD and the speedup (vanilla steps / REPA steps), the same in
wall-clock time from each arm's measured seconds per step, the teachers' kNN accuracy, a
markdown table, a JSON file and a PNG plot. Finished runs are stored atomically under
``--out``/runs, so an interrupted benchmark continues where it stopped when run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402

ARMS = ("vanilla", "repa", "repa-stop", "random-teacher", "dispersive", "sra", "repa-dispersive")
#: the arms run when --arms is not given (the encoder-free arms are chosen with --arms)
DEFAULT_ARMS = ("vanilla", "repa", "repa-stop", "random-teacher")
ARM_LABELS = {
    "vanilla": "vanilla",
    "repa": "REPA",
    "repa-stop": "REPA + stop",
    "random-teacher": "REPA, random teacher",
    "dispersive": "Dispersive",
    "sra": "SRA",
    "repa-dispersive": "REPA + Dispersive",
}
#: arms that align to a teacher's precomputed targets, and which teacher
TEACHER_OF = {"repa": "trained", "repa-stop": "trained", "repa-dispersive": "trained", "random-teacher": "random"}
TEACHER = "fmnist-vit"
FORMAT = "repa-convergence/1"


@dataclass
class ConvConfig:
    """Every setting of a convergence benchmark (one field per command-line flag)."""

    model: str = "SiT-T/4"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    steps: int = 600
    eval_every: int = 200
    seeds: int = 3
    batch_size: int = 64
    learning_rate: float = 1e-3
    ema_decay: float = 0.995
    cfg_prob: float = 0.1
    encoder_depth: int = 2
    proj_coeff: float = 4.0
    projector_dim: int = 128
    stop_at: float = 0.5
    samples: int = 2000
    sample_steps: int = 6
    solver: str = "heun"
    evaluator_epochs: int = 2
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    random_teacher_seed: int = 0
    # encoder-free arms, at their papers' defaults (depths counted from 1; 0 = the paper's rule)
    disp_weight: float = 0.5
    disp_temperature: float = 0.5
    disp_depth: int = 0
    sra_weight: float = 0.2
    sra_student_depth: int = 2
    sra_teacher_depth: int = 4
    sra_max_gap: float = 0.2
    arms: Tuple[str, ...] = DEFAULT_ARMS
    threads: Optional[int] = None
    # the factors of the teacher-ladder study (left out of the fingerprint at their defaults, so
    # runs stored before they existed are still reused)
    unconditional: bool = False  # train and sample without labels (every label is the null class)
    teacher_weights: str = ""  # another fmnist-vit weights file for the REPA arms ("" = the registry's)
    weight_schedule: str = "constant"  # REPA arms: constant, linear-decay or cosine-decay to 0 at stop_at

    def __post_init__(self) -> None:
        if self.weight_schedule not in SCHEDULES:
            raise SystemExit(f"convergence: weight_schedule {self.weight_schedule!r}; choose from {list(SCHEDULES)}")
        if self.teacher_weights and not os.path.isfile(self.teacher_weights):
            raise SystemExit(f"convergence: teacher weights {self.teacher_weights!r} is not a file")

    def fingerprint(self, arm: Optional[str] = None) -> str:
        """What a stored run of ``arm`` must share with this config to be reused (everything but threads).

        A teacher weights file counts by its content (sha256), not by its path. The vanilla arm
        does not read the REPA-only fields, nor the random teacher the teacher file, so they do
        not count for those arms (a sweep's variants then share one vanilla run).
        """
        d = dataclasses.asdict(self)
        d.pop("threads")
        d.pop("seeds")
        d.pop("arms")
        if arm == "vanilla":
            for name in REPA_ONLY:
                d.pop(name)
        elif arm == "random-teacher":
            d.pop("teacher_weights")
        for name, default in NEW_FIELD_DEFAULTS.items():
            if d.get(name, default) == default:
                d.pop(name, None)
        if d.get("teacher_weights"):
            d["teacher_weights"] = _file_sha256(d["teacher_weights"])
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def eval_steps(self) -> List[int]:
        points = list(range(self.eval_every, self.steps + 1, self.eval_every))
        if not points or points[-1] != self.steps:
            points.append(self.steps)
        return points


#: fields only the REPA arms read
REPA_ONLY = ("encoder_depth", "proj_coeff", "projector_dim", "stop_at", "random_teacher_seed", "teacher_weights",
             "weight_schedule")
#: fields added after runs were first stored: left out of the fingerprint at these defaults
NEW_FIELD_DEFAULTS = {"unconditional": False, "teacher_weights": "", "weight_schedule": "constant"}
SCHEDULES = ("constant", "linear-decay", "cosine-decay")


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: ``--quick``: one seed, 200 steps, 1000 samples per evaluation with Heun 6; the rest as the full mode.
QUICK = dict(seeds=1, steps=200, eval_every=100, samples=1000, sample_steps=6)
#: ``--tiny``: a seconds-long smoke run for the test suite (numbers mean nothing).
TINY = dict(
    model_kwargs={"depth": 2, "hidden_size": 32, "num_heads": 2},
    steps=6, eval_every=3, seeds=2, batch_size=8, projector_dim=16, encoder_depth=1, samples=40,
    sample_steps=2, evaluator_epochs=1, train_limit=256, test_limit=200, stop_at=0.5, sra_student_depth=1,
    sra_teacher_depth=2,
)


# ------------------------------------------------------------------------------------ data


def load_fashion_mnist(data: Optional[str], cfg: ConvConfig) -> Dict[str, torch.Tensor]:
    """Train and test images as uint8 (N, 1, 28, 28) tensors with int64 labels."""
    from repa.sit.data import load_idx_split

    out: Dict[str, torch.Tensor] = {}
    for split, limit in (("train", cfg.train_limit), ("test", cfg.test_limit)):
        images, labels = load_idx_split(data or "/usr/share/datasets/fashion-mnist", split)
        images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        out[f"{split}_images"], out[f"{split}_labels"] = images.contiguous(), labels
    return out


# ------------------------------------------------------------------------------------ evaluator


class Evaluator(nn.Module):
    """The FD feature extractor: a small CNN classifier; ``features`` is its 128-d penultimate layer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (B, 16, 14, 14)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (B, 32, 7, 7)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),  # (B, 64, 7, 7)
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True),  # (B, 128)
        )
        self.head = nn.Linear(128, num_classes)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 1, H, W) -> float in [-1, 1] (float images in [-1, 1] pass through)."""
        return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))  # (B, 128)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, classes)


@torch.no_grad()
def evaluator_features(evaluator: Evaluator, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    evaluator.eval()
    return torch.cat([evaluator.features(images[i : i + batch]) for i in range(0, images.shape[0], batch)]).double()


class Scorer:
    """The readouts of generated samples, all in the evaluator's feature space.

    Calling it gives the FD against the whole test set (the benchmark's main readout);
    :meth:`score` adds the class consistency of conditional samples (the evaluator's accuracy
    on them, against the labels they were generated for) and improved precision and recall
    (Kynkaanniemi et al. 2019, k = 3) against ``n_real`` test images drawn once.
    """

    def __init__(self, evaluator: Evaluator, test_images: torch.Tensor, n_real: int) -> None:
        from repa.metrics import feature_stats

        self.evaluator = evaluator
        feats = evaluator_features(evaluator, test_images)  # (N, 128) float64
        self.ref_mu, self.ref_sigma = feature_stats(feats)
        g = torch.Generator().manual_seed(20190412)
        self.real = feats[torch.randperm(feats.shape[0], generator=g)[: min(n_real, feats.shape[0])]]
        self.floor: Dict[str, Optional[float]] = {}  # the readouts of real training images (set by prepare)

    def _fd(self, feats: torch.Tensor) -> float:
        from repa.metrics import feature_stats, frechet_distance_from_stats

        mu, sigma = feature_stats(feats)
        return float(frechet_distance_from_stats(mu, sigma, self.ref_mu, self.ref_sigma))

    def __call__(self, images: torch.Tensor) -> float:
        return self._fd(evaluator_features(self.evaluator, images))

    def score(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Dict[str, Optional[float]]:
        """FD, precision, recall, and class consistency (None without labels)."""
        from repa.metrics import precision_recall

        feats = evaluator_features(self.evaluator, images)
        precision, recall = precision_recall(self.real, feats, k=3)
        consistency = None
        if labels is not None:
            with torch.no_grad():
                pred = self.evaluator.head(feats.float()).argmax(1)
            consistency = float((pred == labels).float().mean())
        return {"fd": self._fd(feats), "precision": precision, "recall": recall, "class_consistency": consistency}


def train_evaluator(
    data: Dict[str, torch.Tensor], epochs: int, *, seed: int = 1234, progress: bool = True, log=print
) -> Tuple[Evaluator, float]:
    """Train the CNN on the training labels (Adam, light shift augmentation); return it and its test accuracy."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = Evaluator()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x, y = data["train_images"], data["train_labels"]
    n, batch = x.shape[0], 128
    total = epochs * max(1, n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total)
    net.train()
    step = 0
    bar = tqdm(total=total, desc="evaluator", unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1 if n >= batch else 1, batch):
            idx = perm[i : i + batch]
            xb = Evaluator.prepare(x[idx])
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()  # small translations
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step >= total:
                break
    bar.close()
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(data["test_images"][i : i + 1000]) for i in range(0, data["test_images"].shape[0], 1000)])
    acc = float((logits.argmax(1) == data["test_labels"]).float().mean())
    log(f"evaluator: CNN classifier, {epochs} epoch(s), test accuracy {acc:.4f}")
    return net, acc


def load_or_train_evaluator(
    data: Dict[str, torch.Tensor], cfg: ConvConfig, folder: Path, *, progress: bool = True, log=print
) -> Tuple[Evaluator, float]:
    """The evaluator is trained once per data setting and kept in ``folder`` (safetensors + accuracy)."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([cfg.evaluator_epochs, cfg.train_limit, cfg.test_limit]).encode()).hexdigest()[:12]
    weights, record = folder / f"evaluator-{key}.safetensors", folder / f"evaluator-{key}.json"
    if weights.is_file() and record.is_file():
        net = Evaluator()
        net.load_state_dict(load_file(str(weights)))
        acc = float(json.loads(record.read_text())["test_accuracy"])
        log(f"evaluator: reusing {weights} (test accuracy {acc:.4f})")
        return net.eval(), acc
    net, acc = train_evaluator(data, cfg.evaluator_epochs, progress=progress, log=log)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(f".{weights.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    write_json({"test_accuracy": acc, "epochs": cfg.evaluator_epochs}, str(record))
    return net, acc


# ------------------------------------------------------------------------------------ teachers


@torch.no_grad()
def teacher_targets(encoder: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The encoder's patch tokens of every image, computed once: (N, 49, D) float16."""
    return torch.cat([encoder(images[i : i + batch]).half() for i in range(0, images.shape[0], batch)])


def teacher_key(arm: str, cfg: ConvConfig) -> str:
    """Which teacher an arm aligns to: ``random``, ``trained`` (the registry's) or ``file:<path>``."""
    if TEACHER_OF[arm] == "random":
        return "random"
    return f"file:{cfg.teacher_weights}" if cfg.teacher_weights else "trained"


def _build_teacher(key: str, cfg: ConvConfig, data: Dict[str, torch.Tensor], log=print) -> Dict[str, Any]:
    """One teacher's targets for every training image, with its kNN and linear-probe accuracy."""
    from repa.encoders import create_encoder, get_encoder_spec, locate_weights
    from repa.metrics import linear_probe
    from repa.sit.teacher import knn_accuracy

    t0 = time.perf_counter()
    if key == "random":
        torch.manual_seed(cfg.random_teacher_seed)
        encoder = create_encoder(TEACHER, pretrained=False)
        found = f"random init (seed {cfg.random_teacher_seed})"
    elif key == "trained":
        encoder = create_encoder(TEACHER)
        found = str(locate_weights(get_encoder_spec(TEACHER))[0])
    else:
        found = key[len("file:"):]
        encoder = create_encoder(TEACHER, weights=found)
    targets = teacher_targets(encoder, data["train_images"])  # (N, 49, D)
    seconds = time.perf_counter() - t0
    train_pooled = targets.float().mean(1)
    test_pooled = teacher_targets(encoder, data["test_images"]).float().mean(1)
    k = min(20, targets.shape[0])
    acc = knn_accuracy(train_pooled, data["train_labels"], test_pooled, data["test_labels"], k)
    probe = linear_probe(train_pooled, data["train_labels"], test_pooled, data["test_labels"], num_classes=10)
    log(f"teacher ({key}): {found}; kNN accuracy {acc:.4f} (k={k}, cosine, mean-pooled tokens), linear probe "
        f"{probe:.4f}; targets {tuple(targets.shape)} computed once in {seconds:.1f} s")
    return {"targets": targets, "knn_accuracy": acc, "linear_probe_accuracy": probe, "weights": found,
            "seconds": seconds, "embed_dim": int(targets.shape[-1])}


def teacher_for(arm: str, cfg: ConvConfig, data: Dict[str, torch.Tensor], teachers: Dict[str, Any]) -> Dict[str, Any]:
    """The teacher of ``arm`` under ``cfg``, built on first use and kept in ``teachers``."""
    key = teacher_key(arm, cfg)
    if key not in teachers:
        teachers[key] = _build_teacher(key, cfg, data)
    return teachers[key]


def build_teachers(cfg: ConvConfig, data: Dict[str, torch.Tensor], log=print) -> Dict[str, Any]:
    """The teachers ``cfg.arms`` align to, and raw pixels' kNN accuracy for comparison."""
    out: Dict[str, Any] = {}
    for arm in cfg.arms:
        if arm in TEACHER_OF and teacher_key(arm, cfg) not in out:
            out[teacher_key(arm, cfg)] = _build_teacher(teacher_key(arm, cfg), cfg, data, log=log)
    from repa.sit.teacher import knn_accuracy

    pixels = knn_accuracy(data["train_images"].flatten(1).float(), data["train_labels"],
                          data["test_images"].flatten(1).float(), data["test_labels"], min(20, data["train_images"].shape[0]))
    out["pixel_knn_accuracy"] = pixels
    log(f"raw pixels: kNN accuracy {pixels:.4f} (same protocol)")
    return out


# ------------------------------------------------------------------------------------ one run


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * (seed + 1) + step)


def sample_labels(cfg: ConvConfig, n: int) -> torch.Tensor:
    """The labels samples are generated for: class-balanced, or all null (10) when unconditional."""
    return torch.full((n,), 10) if cfg.unconditional else torch.arange(n) % 10


@torch.no_grad()
def generate(model: nn.Module, cfg: ConvConfig, n: int, batch: int = 500) -> torch.Tensor:
    """``n`` class-balanced samples in [-1, 1] (n, 1, 28, 28), the same noise and labels for every arm."""
    from repa.sit.sampling import sample

    model.eval()
    g = torch.Generator().manual_seed(20241007)
    labels = sample_labels(cfg, n)
    noise = torch.randn(n, 1, 28, 28, generator=g)
    out = []
    for i in range(0, n, batch):
        x = sample(model, noise[i : i + batch], labels[i : i + batch], method="ode", solver=cfg.solver,
                   steps=cfg.sample_steps, cfg_scale=1.0, path="linear")
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def run_arm(
    arm: str,
    seed: int,
    cfg: ConvConfig,
    data: Dict[str, torch.Tensor],
    teachers: Dict[str, Any],
    fd_fn,
    *,
    progress: bool = True,
    save_to: Optional[Path] = None,
) -> Dict[str, Any]:
    """Train one arm on one seed; FD of the EMA model at every evaluation step; seconds per training step.

    ``save_to``: also store the final EMA weights there (safetensors, written atomically).
    """
    from tqdm.auto import tqdm

    from repa import DispersiveRegularizer, REPARegularizer, SelfAlignmentRegularizer
    from repa.schedules import CosineDecay, LinearDecay, StopAt
    from repa.sit.configs import build_model
    from repa.sit.ema import EMA
    from repa.sit.step import StepBatch, training_step
    from repa.sit.transport import get_path, sample_time

    torch.manual_seed(seed)  # the same SiT initialization in every arm
    model = build_model(cfg.model, input_size=28, in_channels=1, num_classes=10, class_dropout_prob=cfg.cfg_prob,
                        **cfg.model_kwargs)
    reg = None
    targets = None
    if arm in TEACHER_OF:
        teacher = teacher_for(arm, cfg, data, teachers)
        targets = teacher["targets"]
        weight: Any = cfg.proj_coeff
        end = int(round(cfg.stop_at * cfg.steps))
        if arm == "repa-stop":
            weight = StopAt(cfg.proj_coeff, stop=end)
        elif cfg.weight_schedule != "constant":
            kind = LinearDecay if cfg.weight_schedule == "linear-decay" else CosineDecay
            weight = kind(cfg.proj_coeff, start=0, end=end)
        torch.manual_seed(seed + 7919)  # projectors: their own stream, the SiT init stays shared
        reg = REPARegularizer(model, layers=cfg.encoder_depth - 1, encoders={TEACHER: teacher["embed_dim"]},
                              weight=weight, projector_dim=cfg.projector_dim)
    disp = sra = None
    if arm in ("dispersive", "repa-dispersive"):  # the paper's block: depth // 4, counted from 1
        depth = cfg.disp_depth or max(1, len(model.blocks) // 4)
        disp = DispersiveRegularizer(model, layers=depth - 1, weight=cfg.disp_weight, temperature=cfg.disp_temperature)
    ema = EMA({"model": model}, cfg.ema_decay)
    if arm == "sra":  # the EMA model is the teacher
        torch.manual_seed(seed + 7919)
        sra = SelfAlignmentRegularizer(model, ema["model"], cfg.sra_student_depth - 1, cfg.sra_teacher_depth - 1,
                                       weight=cfg.sra_weight, max_gap=cfg.sra_max_gap)
    params = list(model.parameters()) + [p for r in (reg, sra) if r is not None for p in r.parameters()]
    objectives = {k: v for k, v in (("dispersive", disp), ("sra", sra)) if v is not None}
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    path = get_path("linear")
    images, labels = data["train_images"], data["train_labels"]
    n = images.shape[0]
    order = torch.Generator().manual_seed(seed)
    perm, cursor = torch.randperm(n, generator=order), 0
    evals = set(cfg.eval_steps())
    curve: List[Dict[str, Any]] = []
    step_seconds: List[float] = []
    align_losses: List[float] = []
    bar = tqdm(total=cfg.steps, desc=f"{arm} seed {seed}", unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    model.train()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        if cursor + cfg.batch_size > n:
            perm, cursor = torch.randperm(n, generator=order), 0
        idx = perm[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        x = images[idx].float() / 127.5 - 1  # (B, 1, 28, 28)
        g = _step_generator(seed, step)
        t = sample_time(x.shape[0], "uniform", path=path, generator=g)
        noise = torch.randn(x.shape, generator=g)
        drop = (torch.rand(x.shape[0], generator=g) < cfg.cfg_prob).long()
        if cfg.unconditional:  # drawn all the same, so every arm keeps the same random stream
            drop = torch.ones_like(drop)
        # the library's own step (repa.sit.step): loss, backward, clip 1.0, AdamW, EMA with this benchmark's warm-up
        record = training_step(
            model, StepBatch(x=x, y=labels[idx], t=t, noise=noise, drop=drop,
                             features={TEACHER: targets[idx].float()} if reg is not None else None),
            path=path, optimizer=opt, regularizer=reg, objectives=objectives, max_grad_norm=1.0,
            ema=ema, ema_sources={"model": model}, ema_decay=min(cfg.ema_decay, (1 + step) / (10 + step)),
            generator=g, global_batch=x.shape[0],
        )
        step_seconds.append(time.perf_counter() - t0)
        if arm != "vanilla":  # the weighted representation terms of the step
            align_losses.append(float(record.alignment_total))
        bar.update(1)
        if step + 1 in evals:
            t1 = time.perf_counter()
            samples = generate(ema["model"], cfg, cfg.samples)
            scores = fd_fn.score(samples, None if cfg.unconditional else sample_labels(cfg, cfg.samples))
            fd = scores["fd"]
            curve.append({"step": step + 1, **scores, "eval_seconds": time.perf_counter() - t1})
            bar.set_postfix(fd=f"{fd:.1f}")
            model.train()
    bar.close()
    for r in (reg, disp, sra):
        if r is not None:
            r.remove()
    if save_to is not None:
        _save_weights(ema["model"], save_to)
    return {
        "arm": arm,
        "seed": seed,
        "curve": curve,
        "median_step_s": statistics.median(step_seconds),
        "mean_step_s": statistics.fmean(step_seconds),
        "train_seconds": sum(step_seconds),
        "final_loss_align": statistics.fmean(align_losses[-50:]) if align_losses else None,
    }


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def sampler_check(cfg: ConvConfig, runs_dir: Path, fd_fn, arms: Sequence[str] = ("vanilla", "repa")) -> List[Dict[str, Any]]:
    """FD of seed 0's final EMA models under the benchmark's sampler and two finer ones.

    Shows whether the sampler's discretization, rather than the model, dominates the FD.
    """
    from safetensors.torch import load_file

    from repa.sit.configs import build_model

    settings = [(cfg.solver, cfg.sample_steps), ("heun", 2 * cfg.sample_steps), ("euler", 50)]
    rows = []
    for arm in arms:
        path = runs_dir / f"{arm}-seed0.safetensors"
        if not path.is_file():
            continue
        model = build_model(cfg.model, input_size=28, in_channels=1, num_classes=10, **cfg.model_kwargs)
        model.load_state_dict(load_file(str(path)))
        row: Dict[str, Any] = {"arm": arm}
        for solver, steps in settings:
            check = dataclasses.replace(cfg, solver=solver, sample_steps=steps)
            row[f"{solver}-{steps}"] = fd_fn(generate(model, check, cfg.samples))
        rows.append(row)
        print(f"sampler check, {arm} seed 0 at step {cfg.steps}: "
              + ", ".join(f"{k} FD {v:.2f}" for k, v in row.items() if k != "arm"), flush=True)
    return rows


# ------------------------------------------------------------------------------------ analysis


def steps_to_reach(curve: Sequence[Tuple[float, float]], target: float) -> Optional[float]:
    """The first step at which a piecewise-linear FD curve [(step, fd), ...] comes down to ``target``.

    Linear interpolation between the two evaluation points around the crossing; None if the
    curve never reaches ``target``; the first point's step if it is already at or below it (so
    the speedup computed from it is a lower bound).
    """
    prev: Optional[Tuple[float, float]] = None
    for s, fd in curve:
        if fd <= target:
            if prev is None or prev[1] == fd:
                return float(s)
            s0, f0 = prev
            return s0 + (s - s0) * (f0 - target) / (f0 - fd)
        prev = (s, fd)
    return None


#: readouts besides FD stored at each evaluation (see Scorer.score)
READOUTS = ("class_consistency", "precision", "recall")


def summarize(runs: List[Dict[str, Any]], cfg: ConvConfig, target_seconds: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """Mean and spread of FD per arm and step; steps and wall-clock speedups to vanilla's final FD.

    ``target_seconds``: arm -> one-time seconds spent computing its teacher's targets; when
    given, a second wall-clock speedup charges that time to the arm.
    """
    by_arm: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(r)
    steps = cfg.eval_steps()
    arms: Dict[str, Any] = {}
    for arm, rs in by_arm.items():
        fds = [[p["fd"] for p in r["curve"]] for r in rs]  # seeds x points
        mean = [statistics.fmean(col) for col in zip(*fds)]
        arms[arm] = {
            "label": ARM_LABELS[arm],
            "seeds": [r["seed"] for r in rs],
            "fd_mean": mean,
            "fd_min": [min(col) for col in zip(*fds)],
            "fd_max": [max(col) for col in zip(*fds)],
            "fd_std": [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*fds)],
            "step_s": statistics.fmean(r["median_step_s"] for r in rs),  # steady state, no warm-up step
        }
        for key in READOUTS:  # the final evaluation's other readouts, mean over seeds (runs stored before them lack them)
            vals = [r["curve"][-1].get(key) for r in rs]
            arms[arm][f"final_{key}"] = statistics.fmean(vals) if vals and None not in vals else None
    out: Dict[str, Any] = {"steps": steps, "arms": arms}
    if "vanilla" not in arms:
        return out
    van = arms["vanilla"]
    target = van["fd_mean"][-1]
    out["target_fd"] = target
    vanilla_seconds = cfg.steps * van["step_s"]
    for arm, a in arms.items():
        if arm == "vanilla":
            continue
        reach = steps_to_reach(list(zip(steps, a["fd_mean"])), target)
        a["steps_to_vanilla_final"] = reach
        a["speedup_steps"] = cfg.steps / reach if reach else None
        a["speedup_wallclock"] = vanilla_seconds / (reach * a["step_s"]) if reach else None
        if target_seconds is not None:
            extra = target_seconds.get(arm, 0.0)
            a["target_seconds"] = extra
            a["speedup_wallclock_incl_targets"] = vanilla_seconds / (reach * a["step_s"] + extra) if reach else None
        a["reached_at_first_eval"] = bool(reach is not None and reach == steps[0])
        per_seed = []
        for r in by_arm[arm]:
            v = next((x for x in by_arm["vanilla"] if x["seed"] == r["seed"]), None)
            if v is None:
                continue
            rs = steps_to_reach([(p["step"], p["fd"]) for p in r["curve"]], v["curve"][-1]["fd"])
            per_seed.append(cfg.steps / rs if rs else None)
        a["speedup_steps_per_seed"] = per_seed
    return out


# ------------------------------------------------------------------------------------ output


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _num(x: float) -> str:
    """Three significant digits, no exponent for the FD range (0.01 .. 10^4)."""
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3g}"


def format_tables(result: Dict[str, Any]) -> str:
    s = result["summary"]
    steps = s["steps"]
    lines = ["| arm | " + " | ".join(f"FD @ {k}" for k in steps) + " | s/step |",
             "|---|" + "---:|" * (len(steps) + 1)]
    for arm in ARMS:
        if arm not in s["arms"]:
            continue
        a = s["arms"][arm]
        cells = [f"{_num(m)} ± {_num(d)}" if len(a["seeds"]) > 1 else _num(m) for m, d in zip(a["fd_mean"], a["fd_std"])]
        lines.append(f"| {a['label']} | " + " | ".join(cells) + f" | {a['step_s']:.4f} |")
    if "target_fd" in s:
        lines += ["", f"Target: vanilla's final FD {_num(s['target_fd'])} at step {steps[-1]}.", "",
                  "| arm | steps to reach it | speedup (steps) | per seed | speedup (wall clock) | with the one-time targets |",
                  "|---|---:|---:|---|---:|---:|"]
        for arm in ARMS[1:]:
            if arm not in s["arms"]:
                continue
            a = s["arms"][arm]
            reach = a["steps_to_vanilla_final"]
            bound = ">= " if a["reached_at_first_eval"] else ""
            per_seed = ", ".join(_fmt(x, ".2f") for x in a["speedup_steps_per_seed"])
            lines.append(
                f"| {a['label']} | {'not reached' if reach is None else f'{reach:.0f}'} | "
                f"{bound}{_fmt(a['speedup_steps'], '.2f')} | {per_seed} | {bound}{_fmt(a['speedup_wallclock'], '.2f')} | "
                f"{bound}{_fmt(a.get('speedup_wallclock_incl_targets'), '.2f')} |"
            )
    if any(s["arms"][a].get("final_precision") is not None for a in s["arms"]):
        lines += ["", f"At step {steps[-1]} (mean over seeds; real training images: "
                  + ", ".join(f"{k.replace('_', ' ')} {_fmt(result['evaluation'].get('floor_scores', {}).get(k), '.3f')}"
                              for k in READOUTS) + "):", "",
                  "| arm | class consistency | precision | recall |", "|---|---:|---:|---:|"]
        for arm in ARMS:
            if arm in s["arms"]:
                a = s["arms"][arm]
                lines.append(f"| {a['label']} | " + " | ".join(_fmt(a[f"final_{k}"], ".3f") for k in READOUTS) + " |")
    checks = result.get("sampler_check")
    if checks:
        keys = [k for k in checks[0] if k != "arm"]
        lines += ["", f"Sampler check (seed 0, final EMA model, FD of {result['config']['samples']} samples):", "",
                  "| arm | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for row in checks:
            lines.append(f"| {ARM_LABELS[row['arm']]} | " + " | ".join(_num(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: Path) -> Optional[Path]:
    """FD against steps, one line per arm (mean over seeds, band = min..max), the floor dashed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    s = result["summary"]
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"vanilla": "#444444", "repa": "#d62728", "repa-stop": "#ff7f0e", "random-teacher": "#1f77b4",
              "dispersive": "#2ca02c", "sra": "#9467bd", "repa-dispersive": "#8c564b"}
    for arm in ARMS:
        if arm not in s["arms"]:
            continue
        a = s["arms"][arm]
        ax.plot(s["steps"], a["fd_mean"], marker="o", ms=3, color=colors[arm], label=f"{a['label']} ({len(a['seeds'])} seed{'s' if len(a['seeds']) > 1 else ''})")
        if len(a["seeds"]) > 1:
            ax.fill_between(s["steps"], a["fd_min"], a["fd_max"], color=colors[arm], alpha=0.15, lw=0)
    ax.axhline(result["evaluation"]["floor_fd"], ls="--", color="gray", lw=1, label="real vs real (floor)")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"FD (CNN features, {result['config']['samples']} samples vs test set)")
    ax.set_title("Fashion-MNIST, SiT-T/4: FD against steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(str(tmp), format="png")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------ main


FIELD_HELP = {
    "unconditional": "train and sample without labels (every label is the null class; no class consistency)",
    "teacher_weights": "fmnist-vit weights file the REPA arms align to (default: the registry's local weights)",
    "weight_schedule": "REPA arms' weight: constant, or decaying from --proj-coeff to 0 at --stop-at of the run",
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    d = ConvConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=f"one seed, shorter runs ({QUICK})")
    mode.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests); its numbers mean nothing")
    p.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/convergence-<mode>)")
    p.add_argument("--evaluator-dir", default=None,
                   help="where the trained evaluator is kept and reused (default: benchmarks/results/evaluator)")
    p.add_argument("--runs-dir", default=None,
                   help="where finished runs are stored and reused (default: OUT/runs; may be a sweep's runs folder)")
    p.add_argument("--only-seeds", default=None,
                   help="comma-separated seeds of 0..SEEDS-1 to run now (e.g. one process per seed into a shared "
                        "--runs-dir; a last run without it reuses them all and writes the result)")
    p.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ARMS)}")
    for f in dataclasses.fields(ConvConfig):
        if f.name in ("arms", "model_kwargs"):
            continue
        flag, default = "--" + f.name.replace("_", "-"), getattr(d, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=None, help=FIELD_HELP.get(f.name))
            continue
        kind = {int: int, float: float, str: str}.get(type(default), int)
        choices = SCHEDULES if f.name == "weight_schedule" else None
        p.add_argument(flag, type=kind, default=None, choices=choices,
                       help=f"{FIELD_HELP.get(f.name, '')} (default: {default!r})".strip())
    p.add_argument("--check-sampler", action="store_true",
                   help="also score seed 0's final vanilla and REPA models with 2x the sampler steps and with Euler 50")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ConvConfig:
    values: Dict[str, Any] = {}
    if args.quick:
        values.update(QUICK)
    if args.tiny:
        values.update(TINY)
    for f in dataclasses.fields(ConvConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in ("arms", "model_kwargs"):
            values[f.name] = v
    if args.arms:
        arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
        bad = [a for a in arms if a not in ARMS]
        if bad:
            raise SystemExit(f"convergence.py: unknown arm(s) {bad}; choose from {list(ARMS)}")
        values["arms"] = arms
    cfg = ConvConfig(**values)
    if not 1 <= cfg.stop_at * cfg.steps <= cfg.steps:
        raise SystemExit(f"convergence.py: --stop-at {cfg.stop_at} must be a fraction in (0, 1] of the run")
    if cfg.samples < 10 or cfg.samples % 10:
        raise SystemExit(f"convergence.py: --samples {cfg.samples} must be a positive multiple of 10 (class-balanced)")
    return cfg


def prepare(
    cfg: ConvConfig,
    *,
    data_dir: Optional[str] = None,
    evaluator_dir: Optional[str] = None,
    progress: bool = True,
) -> Tuple[Dict[str, torch.Tensor], Scorer, float, float, Dict[str, Any]]:
    """What every run shares: the data, the scorer, the real-vs-real floor, the evaluator's accuracy, the teachers.

    Returns ``(data, scorer, floor, evaluator_accuracy, teachers)``; ``scorer(images)`` is the FD
    of float images in [-1, 1] against the test set in the evaluator's feature space.
    """
    data = load_fashion_mnist(data_dir, cfg)
    ev_dir = Path(evaluator_dir or Path(__file__).resolve().parent / "results" / "evaluator")
    evaluator, eval_acc = load_or_train_evaluator(data, cfg, ev_dir, progress=progress)
    scorer = Scorer(evaluator, data["test_images"], cfg.samples)
    g = torch.Generator().manual_seed(99)
    pick = torch.randperm(data["train_images"].shape[0], generator=g)[: cfg.samples]
    real = data["train_images"][pick]
    scorer.floor = scorer.score(real, data["train_labels"][pick])
    floor = scorer.floor["fd"]
    print(f"real vs real: FD {floor:.2f}, precision {scorer.floor['precision']:.3f}, recall {scorer.floor['recall']:.3f}, "
          f"class consistency {scorer.floor['class_consistency']:.3f} ({real.shape[0]} training images vs "
          f"{data['test_images'].shape[0]} test images)")
    teachers = build_teachers(cfg, data, log=print)
    return data, scorer, floor, eval_acc, teachers


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"convergence-{mode}")
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    command = shlex.join(["python", "benchmarks/convergence.py", *(sys.argv[1:] if argv is None else argv)])
    t_start = time.perf_counter()
    print(f"convergence benchmark ({mode}): {command}", flush=True)

    data, fd_fn, floor, eval_acc, teachers = prepare(cfg, data_dir=args.data, evaluator_dir=args.evaluator_dir,
                                                     progress=progress)

    runs_dir = Path(args.runs_dir) if args.runs_dir else out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs: List[Dict[str, Any]] = []
    seeds = range(cfg.seeds)
    if args.only_seeds:
        seeds = [int(s) for s in args.only_seeds.split(",")]
        if any(not 0 <= s < cfg.seeds for s in seeds):
            raise SystemExit(f"convergence.py: --only-seeds {args.only_seeds} must lie in 0..{cfg.seeds - 1}")
    for seed in seeds:
        for arm in cfg.arms:  # interleaved by seed, so machine drift lands on every arm
            fingerprint = cfg.fingerprint(arm)
            record = runs_dir / f"{arm}-{fingerprint}-seed{seed}.json"  # the naming of convergence_sweep.py
            if record.is_file():
                print(f"{arm} seed {seed}: reusing {record}")
                runs.append(json.loads(record.read_text()))
                continue
            r = run_arm(arm, seed, cfg, data, teachers, fd_fn, progress=progress,
                        save_to=runs_dir / f"{arm}-seed{seed}.safetensors")
            r["fingerprint"] = fingerprint
            write_json(r, str(record))
            runs.append(r)
            print(f"{arm} seed {seed}: FD " + ", ".join(f"{p['step']}: {p['fd']:.1f}" for p in r["curve"])
                  + f"; {r['mean_step_s']:.4f} s/step", flush=True)

    checks = sampler_check(cfg, runs_dir, fd_fn) if args.check_sampler else None
    result: Dict[str, Any] = {
        "format": FORMAT,
        "mode": mode,
        "command": command,
        "config": dataclasses.asdict(cfg),
        "environment": environment(torch.device("cpu")),
        "evaluation": {
            "evaluator": "CNN classifier (3 conv layers + 128-d hidden layer, whose activations are the FD features)",
            "evaluator_test_accuracy": eval_acc,
            "reference": f"Fashion-MNIST test set ({data['test_images'].shape[0]} images)",
            "floor_fd": floor,
            "floor_scores": fd_fn.floor,
            "sampler": f"ODE {cfg.solver}, {cfg.sample_steps} steps, no guidance, EMA {cfg.ema_decay} weights",
        },
        "teachers": {k: {kk: vv for kk, vv in v.items() if kk != "targets"} if isinstance(v, dict) else v
                     for k, v in teachers.items()},
        "runs": runs,
        "sampler_check": checks,
        "summary": summarize(runs, cfg, {
            arm: teachers[teacher_key(arm, cfg)]["seconds"] if arm in TEACHER_OF else 0.0
            for arm in cfg.arms if arm != "vanilla"
        }),
        "total_seconds": time.perf_counter() - t_start,
    }
    write_json(result, str(out / "result.json"))
    png = plot(result, out / "fd_vs_steps.png")
    print()
    print(format_tables(result))
    print()
    print(f"evaluator test accuracy {eval_acc:.4f}; real-vs-real floor FD {floor:.2f}"
          + "".join(f"; teacher {k}: kNN {t['knn_accuracy']:.4f}, linear probe {t['linear_probe_accuracy']:.4f}"
                    for k, t in teachers.items() if isinstance(t, dict)))
    print(f"wrote {out / 'result.json'}" + (f" and {png}" if png else "") + f" in {result['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
