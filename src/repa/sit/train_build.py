"""What ``repa train`` builds before its loop: data, loader, model, REPA, objectives, EMA, optimizer.

Each builder takes the resolved :class:`~repa.sit.configs.TrainConfig` and returns the pieces
:mod:`repa.sit.train` runs. The random-number draws happen in a fixed order (the model from
``seed``, the projectors from ``seed + 1``, the VAE objective from ``seed + 2``, SRA from
``seed + 3``), so a run's initialization depends on its settings only.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..cache import is_feature_cache
from ..errors import CacheMismatchError, ConfigError, WeightsNotFoundError
from .configs import TrainConfig, build_model
from .data import DataInfo, open_dataset
from .distributed import DistInfo, ResumableDistributedSampler, barrier
from .ema import EMA
from .run_control import _worker_init
from .sampling import sample

_log = logging.getLogger("repa")


def _train_teacher_if_possible(name: str, path: Path) -> None:
    """The demo's teacher is missing: run ``repa teacher`` when that command exists, else explain."""
    if importlib.util.find_spec("repa.sit.teacher") is None:
        raise WeightsNotFoundError(
            f"the REPA teacher encoder {name!r} has no weights at {path}; train it first with `repa teacher` "
            "(a few minutes on CPU), or pass --enc-weights FILE, or run the baseline with --no-repa"
        )
    teacher = importlib.import_module("repa.sit.teacher")
    _log.info(
        f"train: the teacher encoder {name!r} has no weights at {path}; training it now with `repa teacher` "
        "(once, a few minutes on CPU)",
    )
    parser = argparse.ArgumentParser(prog="repa teacher")
    teacher.add_arguments(parser)
    status = teacher.main(parser.parse_args([]))
    if status not in (None, 0):
        raise WeightsNotFoundError(f"`repa teacher` failed (exit status {status}); the teacher {name!r} is still missing")


def _build_encoders(cfg: TrainConfig, info: DataInfo, dist_info: DistInfo) -> List[nn.Module]:
    """The frozen encoders named by ``--enc-type``, trained first (rank 0) if the demo teacher is missing."""
    from ..encoders import create_encoder, local_weights_path

    encoders = []
    for name in cfg.encoder_names:
        kwargs = dict(weights=cfg.enc_weights, resolution=info.image_size, device=dist_info.device)
        try:
            encoders.append(create_encoder(name, **kwargs))
            continue
        except WeightsNotFoundError:
            if name.lower() != "fmnist-vit" or cfg.enc_weights is not None:
                raise
        # the offline demo's teacher: train it once (rank 0), the other ranks wait for the file
        failure: Optional[BaseException] = None
        if dist_info.is_main:
            try:
                _train_teacher_if_possible(name, local_weights_path(name))
            except BaseException as exc:  # other ranks must still leave the barrier
                failure = exc
        barrier(dist_info)
        if failure is not None:
            raise failure
        encoders.append(create_encoder(name, **kwargs))
    return encoders


def _open_feature_cache(cfg: TrainConfig, dist_info: DistInfo) -> Tuple[Dataset, DataInfo, Dict[str, int]]:
    """``--data`` is a feature cache (``repa cache``): its dataset, what it feeds, and the target widths.

    Every batch then carries the encoders' targets (``batch["features"]``), so the regularizer is
    built from their widths alone and the frozen encoder is never loaded.
    """
    from ..cache import CachedFeatureDataset

    names = cfg.encoder_names if "repa" in cfg.objectives else []
    if "repa" in cfg.objectives and cfg.enc_weights is not None:
        raise ConfigError(
            f"--enc-weights {cfg.enc_weights!r} has no effect with a feature cache ({cfg.data}): its targets were "
            "computed when the cache was built (see its index.json); drop --enc-weights, or build a cache with "
            "`repa cache --weights NAME=FILE ...`"
        )
    dataset = CachedFeatureDataset(
        cfg.data, encoders=names, resolution=cfg.resolution, verify="sha256" if cfg.verify_cache else "none"
    )
    info = dataset.data_info()
    if info.kind == "pixels" and not dataset.load_images:
        raise CacheMismatchError(
            f"the feature cache {cfg.data} holds neither pixels nor VAE latents (built with --no-images and no "
            "--vae), so there is nothing to train on; rebuild it without --no-images, or with --vae"
        )
    if cfg.vae is not None and info.kind == "pixels":
        raise CacheMismatchError(
            f"the run trains on SD-VAE latents (vae={cfg.vae!r}) but the feature cache {cfg.data} stores no latent "
            f"moments; rebuild it with `repa cache ... --vae {cfg.vae}`, or train in pixel space without --vae"
        )
    if info.kind == "latents":
        dataset.load_images = False  # the step needs the moments only
    entries = {e["name"].lower(): e for e in dataset.index["encoders"]}
    widths = {name: int(entries[name.lower()]["shape"][1]) for name in dataset.encoder_names}
    untrained = [n for n in dataset.encoder_names if entries[n.lower()].get("weights", {}).get("source") == "random"]
    if untrained and dist_info.is_main:
        _log.warning(
            f"train: warning: the feature cache {cfg.data} holds targets of randomly initialized encoder(s) "
            f"{untrained} (built with --no-pretrained): a control experiment, not REPA with a trained teacher",
        )
    return dataset, info, widths


def _describe(obj: nn.Module) -> str:
    """A short description of an objective for the start-up line."""
    names = getattr(obj, "layer_names", [])
    if hasattr(obj, "teacher_layer"):
        return f"{obj.student_layer} -> EMA {obj.teacher_layer}"
    return ", ".join(names)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


@torch.no_grad()
def _write_sample_grid(
    ema_model: nn.Module, cfg: TrainConfig, info: DataInfo, vae: Any, device: torch.device, path: Path
) -> None:
    """A PNG grid of EMA samples with fixed noise and balanced labels (one class per column when <= 16 classes)."""
    from .images import make_grid, save_png, to_uint8

    n = cfg.sample_count
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    shape = (info.input_channels, info.input_size, info.input_size)
    noise = torch.randn((n, *shape), generator=g, device=device)  # (n, C, h, w)
    labels = torch.arange(n, device=device) % info.num_classes  # (n,)
    x = sample(
        ema_model,
        noise,
        labels,
        method=cfg.sample_mode,
        steps=cfg.sample_steps,
        cfg_scale=cfg.sample_cfg,
        guidance_low=0.0,
        guidance_high=1.0,
        path=cfg.path_type,
        generator=g,
    )  # (n, C, h, w)
    if info.kind != "pixels":
        from .data import decode_latents

        x = decode_latents(vae, x, info.latent_scale)  # (n, 3, R, R)
    nrow = info.num_classes if info.num_classes <= 16 else int(math.ceil(math.sqrt(n)))
    grid = make_grid(to_uint8(x), nrow=min(nrow, n))
    save_png(grid, path)


def _build_objectives(cfg: TrainConfig, model: nn.Module, info: DataInfo) -> Dict[str, nn.Module]:
    """The objectives of ``--regularizer`` other than REPA and SRA (SRA needs the EMA model first)."""
    from .. import DispersiveRegularizer, REPARegularizer

    depths = cfg.objective_depths(len(model.blocks))
    for name, depth in depths.items():
        if not 1 <= depth <= len(model.blocks):
            raise ConfigError(
                f"the {name.replace('_', ' ')} depth {depth} is outside the model's {len(model.blocks)} blocks; "
                f"use 1..{len(model.blocks)}"
            )
    out: Dict[str, nn.Module] = {}
    if "dispersive" in cfg.objectives:
        out["dispersive"] = DispersiveRegularizer(
            model,
            layers=depths["dispersive"] - 1,
            weight=cfg.disp_weight,
            variant=cfg.disp_variant,
            temperature=cfg.disp_temperature,
        )
    if "vae" in cfg.objectives:
        if info.kind == "pixels":
            raise ConfigError(
                "--regularizer vae aligns a block with the VAE's latent of the clean image, so it needs a latent "
                "run: pass --vae with an image folder, or --data with prepared latents (pixel runs have no VAE)"
            )
        # targets: the VAE posterior mean (B, c, h, w), read from the moments every latent step already has
        torch.manual_seed(cfg.seed + 2)
        out["vae"] = REPARegularizer(
            model,
            layers=depths["vae"] - 1,
            encoders={"vae-latent": info.input_channels},
            weight=cfg.vae_weight,
            projector_dim=cfg.projector_dim,
        )
    return out


def _build_sra(cfg: TrainConfig, model: nn.Module, ema_model: nn.Module) -> nn.Module:
    """SRA on the training model with the EMA model as teacher (``--regularizer sra``)."""
    from .. import SelfAlignmentRegularizer

    depths = cfg.objective_depths(len(model.blocks))
    torch.manual_seed(cfg.seed + 3)
    return SelfAlignmentRegularizer(
        model,
        ema_model,
        student_layer=depths["sra_student"] - 1,
        teacher_layer=depths["sra_teacher"] - 1,
        weight=cfg.sra_weight,
        max_gap=cfg.sra_max_gap,
    )


def open_data(
    cfg: TrainConfig, dist_info: DistInfo, dataset: Optional[Dataset], data_info: Optional[DataInfo]
) -> Tuple[Dataset, DataInfo, Optional[Dict[str, int]]]:
    """The training set: ``--data`` (an image / IDX / latent folder or a feature cache) or the given one.

    Returns the dataset, what it feeds, and for a feature cache the target width of each encoder.
    """
    if dataset is not None:
        if data_info is None:
            raise ConfigError("train(dataset=...) also needs data_info= (a repa.sit.data.DataInfo)")
        return dataset, data_info, None
    if cfg.data is None and cfg.vae is not None:
        raise ConfigError(
            f"config {cfg.config_name!r} trains on SD-VAE latents: pass --data with a prepared latent folder "
            "(python -m repa.sit.data prepare-latents --data IMAGES --out LATENTS) or an image folder "
            "(class subfolders = labels, encoded on the fly)"
        )
    if cfg.data is not None and is_feature_cache(cfg.data):
        return _open_feature_cache(cfg, dist_info)
    dataset, info = open_dataset(
        cfg.data, resolution=cfg.resolution, vae=cfg.vae, latent_scale=cfg.latent_scale,
        skip_bad_images=cfg.skip_bad_images,
    )
    return dataset, info, None


def build_loader(cfg: TrainConfig, dataset: Dataset, dist_info: DistInfo) -> Tuple[ResumableDistributedSampler, DataLoader]:
    """This rank's resumable sampler and its DataLoader (workers start with the stop signals ignored)."""
    world, device = dist_info.world_size, dist_info.device
    local_batch = cfg.batch_size // world
    sampler = ResumableDistributedSampler(dataset, local_batch, num_replicas=world, rank=dist_info.rank, seed=cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=local_batch,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        generator=torch.Generator(),  # the loader never draws from the global RNG
        persistent_workers=False,
        worker_init_fn=_worker_init if cfg.num_workers > 0 else None,
    )
    if len(loader) == 0:
        raise ConfigError(
            f"the dataset has {len(dataset)} items, fewer than one global batch of {cfg.batch_size}; "
            "lower --batch-size or add data"
        )
    return sampler, loader


@dataclass
class TrainParts:
    """The trained modules and their optimizer (what a checkpoint holds)."""

    model: nn.Module
    model_kwargs: Dict[str, Any]
    reg: Optional[nn.Module]
    objectives: Dict[str, nn.Module]
    ema: EMA
    ema_sources: Dict[str, nn.Module]
    optimizer: torch.optim.Optimizer


def _build_repa(
    cfg: TrainConfig, model: nn.Module, info: DataInfo, dist_info: DistInfo,
    encoders: Optional[Sequence[nn.Module]], cached_widths: Optional[Dict[str, int]],
) -> nn.Module:
    """The REPA regularizer on ``blocks.{encoder_depth - 1}`` with the run's encoders (or cached widths)."""
    from .. import REPARegularizer

    if not 1 <= cfg.encoder_depth <= len(model.blocks):
        raise ConfigError(
            f"--encoder-depth {cfg.encoder_depth} is outside the model's {len(model.blocks)} blocks; "
            f"use 1..{len(model.blocks)} (the paper: 8 for SiT-L/XL, 4 for SiT-B)"
        )
    if encoders is not None:
        enc: Any = list(encoders)
    elif cached_widths is not None:  # targets come precomputed with every batch: never load the encoder
        enc = dict(cached_widths)
    else:
        enc = _build_encoders(cfg, info, dist_info)
    # the projectors' initialization depends on the seed only, not on whether building the
    # encoders drew random numbers (an online encoder does; a feature cache does not)
    torch.manual_seed(cfg.seed + 1)
    # --encoder-depth counts blocks from 1 (paper and reference); layers= is 0-based: depth 8 -> blocks.7
    return REPARegularizer(
        model,
        layers=cfg.repa_layer(),
        encoders=enc,
        weight=cfg.proj_coeff,
        projector_dim=cfg.projector_dim,
    )


def build_parts(
    cfg: TrainConfig, info: DataInfo, dist_info: DistInfo,
    encoders: Optional[Sequence[nn.Module]], cached_widths: Optional[Dict[str, int]],
) -> TrainParts:
    """Model, REPA, the other objectives, EMA (model and projectors) and AdamW, in a fixed seed order."""
    device = dist_info.device
    torch.manual_seed(cfg.seed)  # identical initialization on every rank
    model_kwargs = dict(
        input_size=info.input_size,
        in_channels=info.input_channels,
        num_classes=info.num_classes,
        class_dropout_prob=cfg.cfg_prob,
        **cfg.model_kwargs,
    )
    model = build_model(cfg.model, **model_kwargs).to(device)
    reg = None
    if "repa" in cfg.objectives:
        reg = _build_repa(cfg, model, info, dist_info, encoders, cached_widths).to(device)
    objectives = _build_objectives(cfg, model, info)  # dispersive, vae
    objectives = {k: v.to(device) for k, v in objectives.items()}
    ema_sources: Dict[str, nn.Module] = {"model": model}
    if reg is not None:
        ema_sources["projectors"] = reg.projectors
    if "vae" in objectives:
        ema_sources["vae_projectors"] = objectives["vae"].projectors
    ema = EMA(ema_sources, cfg.ema_decay)
    if "sra" in cfg.objectives:  # the EMA model is SRA's teacher
        objectives["sra"] = _build_sra(cfg, model, ema["model"]).to(device)
    params = [
        *model.parameters(),
        *(reg.parameters() if reg is not None else []),
        *(p for obj in objectives.values() for p in obj.parameters()),
    ]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    return TrainParts(model, model_kwargs, reg, objectives, ema, ema_sources, optimizer)
