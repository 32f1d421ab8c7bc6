"""The command line of ``repa train``: its flags (with the reference script's names as aliases) and their resolution.

Every flag maps to the :class:`~repa.sit.configs.TrainConfig` field of the same name. The
vocabulary is shared with the other subcommands (``--encoder``, ``--encoder-weights``,
``--out``); the names of the official REPA ``train.py`` (``--enc-type``, ``--proj-coeff``,
``--encoder-depth``, ``--output-dir``, ...) are accepted as aliases.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from .configs import CONFIGS, FIELD_NAMES, MIXED_PRECISION, TrainConfig, model_names, resolve_config
from .sampling import METHODS
from .transport import PATHS, TIME_SAMPLERS

__all__ = ["ALIASES", "add_arguments", "config_from_args"]


#: The reference script's flag names (and earlier ``repa train`` names) accepted beside the shared vocabulary.
ALIASES = {
    "--encoder": ("--encoders", "--enc-type"),
    "--encoder-weights": ("--enc-weights",),
    "--out": ("--output-dir",),
}

_Add = Callable[..., None]


def _adder(defaults: TrainConfig) -> _Add:
    """``add(group, flag, help, **kw)``: a flag (plus its :data:`ALIASES`) whose default comes from the config."""

    def add(group: Any, flag: str, help_: str, **kw: Any) -> None:
        name = kw.get("dest") or flag[2:].replace("-", "_")
        default = getattr(defaults, name) if name in FIELD_NAMES else None
        flag_only = kw.get("action") in ("store_true", "store_false")
        shown = "" if flag_only or default is None else f" (default: {default})"
        group.add_argument(flag, *ALIASES.get(flag, ()), default=argparse.SUPPRESS, help=help_ + shown, **kw)

    return add


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``repa train``; each maps to the :class:`TrainConfig` field of the same name."""
    add = _adder(TrainConfig())
    for add_group in (_config_args, _model_data_args, _repa_args, _objective_args, _optimization_args, _output_args):
        add_group(parser, add)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config_args(parser: argparse.ArgumentParser, add: _Add) -> None:
    g = parser.add_argument_group("configuration")
    g.add_argument(
        "--config",
        default=None,
        help=f"a built-in recipe ({', '.join(CONFIGS)}) or a JSON file of settings (field names as the flags, "
        "'base' to extend a recipe); flags override it. Default: the Fashion-MNIST CPU demo",
    )
    g.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")


def _model_data_args(parser: argparse.ArgumentParser, add: _Add) -> None:
    g = parser.add_argument_group("model")
    add(g, "--model", "SiT size (imagenet256: SiT-XL/2)", choices=model_names())
    add(g, "--model-kwargs", "extra SiT arguments as JSON, e.g. '{\"qk_norm\": true}'", type=json.loads)

    g = parser.add_argument_group("data")
    add(
        g,
        "--data",
        "folder of IDX files (Fashion-MNIST format), of images (class subfolders = labels), of prepared "
        "latents (python -m repa.sit.data prepare-latents), or a feature cache (repa cache: the encoder is then "
        "never loaded); default: /usr/share/datasets/fashion-mnist",
    )
    add(g, "--resolution", "center-crop size for image folders", type=int)
    add(g, "--vae", "SD-VAE (diffusers AutoencoderKL folder or cached hub id) to encode image folders on the fly")
    add(g, "--num-workers", "DataLoader worker processes per rank", type=int)
    add(g, "--skip-bad-images", "image folders: skip (with a warning) files that cannot be decoded instead of "
        "stopping; every image is decoded once at start to find them", action="store_true")
    add(
        g,
        "--no-verify-cache",
        "a feature cache --data: skip the sha256 of each shard before its first read (for a cache already checked "
        "with `repa cache verify`); targets are still checked finite as they are read",
        dest="verify_cache",
        action="store_false",
    )



def _repa_args(parser: argparse.ArgumentParser, add: _Add) -> None:
    g = parser.add_argument_group("REPA")
    add(g, "--no-repa", "train the baseline without the alignment term", dest="repa", action="store_false")
    add(g, "--encoder", "frozen encoder(s), comma-separated registry names (imagenet256: dinov2-vit-b); "
        "aliases --encoders, --enc-type (the reference script's)", dest="enc_type")
    add(g, "--encoder-weights", "a local weights file for the encoder instead of its default location; alias "
        "--enc-weights", dest="enc_weights")
    add(
        g,
        "--encoder-depth",
        "align the output of this block, counted from 1 as in the paper: 8 = module blocks.7 = layers=7",
        type=int,
    )
    add(g, "--proj-coeff", "lambda, the alignment loss weight (REPA: 0.5)", type=float)
    add(g, "--projector-dim", "hidden width of the MLP projector (REPA: 2048)", type=int)



def _objective_args(parser: argparse.ArgumentParser, add: _Add) -> None:
    g = parser.add_argument_group("representation objectives (no pretrained encoder needed: dispersive, sra, vae)")
    add(
        g,
        "--regularizer",
        "repa, dispersive (arXiv 2506.09027), sra (self-alignment to the EMA model, arXiv 2505.02831), vae (the VAE's "
        "latent as teacher, arXiv 2601.17830; latent runs only) or none; comma-separated to combine, e.g. repa,dispersive",
    )
    add(g, "--disp-weight", "Dispersive Loss weight lambda (paper: 0.5)", type=float)
    add(g, "--disp-variant", "infonce-l2 (paper default), infonce-cosine, hinge, covariance")
    add(g, "--disp-temperature", "Dispersive Loss temperature tau (paper: 0.5)", type=float)
    add(g, "--disp-depth", "block for the Dispersive Loss, counted from 1 (default: depth // 4, the paper's)", type=int)
    add(g, "--sra-weight", "SRA loss weight (paper: 0.2 with smooth-L1)", type=float)
    add(g, "--sra-student-depth", "SRA student block, counted from 1 (default: --encoder-depth)", type=int)
    add(g, "--sra-teacher-depth", "SRA teacher block of the EMA model, from 1 (default: twice the student's)", type=int)
    add(g, "--sra-max-gap", "SRA teacher time t - U(0, gap) (paper: 0.2)", type=float)
    add(g, "--vae-weight", "weight of the alignment to the VAE latent", type=float)
    add(g, "--vae-depth", "block aligned to the VAE latent, counted from 1 (default: --encoder-depth)", type=int)

    g = parser.add_argument_group("objective")
    add(g, "--path-type", "interpolant path", choices=list(PATHS))
    add(g, "--weighting", "training-time distribution", choices=list(TIME_SAMPLERS))
    add(g, "--cfg-prob", "label dropout probability for classifier-free guidance", type=float)



def _optimization_args(parser: argparse.ArgumentParser, add: _Add) -> None:
    g = parser.add_argument_group("optimization")
    add(g, "--batch-size", "GLOBAL batch size, split evenly over the processes", type=int)
    add(g, "--learning-rate", "AdamW learning rate, constant", type=float)
    add(g, "--adam-beta1", "AdamW beta1", type=float)
    add(g, "--adam-beta2", "AdamW beta2", type=float)
    add(g, "--adam-weight-decay", "AdamW weight decay", type=float)
    add(g, "--adam-epsilon", "AdamW epsilon", type=float)
    add(g, "--max-grad-norm", "gradient clipping norm (<= 0: no clipping)", type=float)
    add(g, "--ema-decay", "EMA decay of the model and projectors (REPA: 0.9999)", type=float)
    add(g, "--mixed-precision", "autocast dtype (fp16 adds a GradScaler)", choices=list(MIXED_PRECISION))
    add(g, "--allow-tf32", "allow TF32 matmuls on Ampere+ GPUs", dest="allow_tf32", action="store_true")
    add(g, "--max-train-steps", "number of optimizer steps", type=int)
    add(g, "--seed", "seed of the initialization, the data order and the per-step noise", type=int)



def _output_args(parser: argparse.ArgumentParser, add: _Add) -> None:
    g = parser.add_argument_group("outputs")
    add(g, "--out", "parent folder of the run folder; alias --output-dir (the reference script's)", dest="output_dir")
    add(g, "--exp-name", "run folder name (default: <config>-<model>-repa|baseline)")
    add(g, "--checkpointing-steps", "write a checkpoint every N steps", type=int)
    add(g, "--log-every", "append a JSONL record every N steps", type=int)
    add(g, "--sample-every", "write a PNG grid of EMA samples every N steps", type=int)
    add(g, "--sample-count", "images in the sample grid", type=int)
    add(g, "--sample-steps", "sampler steps for the grid", type=int)
    add(g, "--sample-mode", "sampler for the grid", choices=list(METHODS))
    add(g, "--sample-cfg", "guidance scale for the grid (1 = none)", type=float)
    add(g, "--tensorboard", "also log to TensorBoard (needs the tensorboard package)", action="store_true")
    add(g, "--resume", "continue from a checkpoint: a file, a run folder, or 'latest' (this run's newest)")
    add(
        g,
        "--init-from",
        "start from an official REPA checkpoint (released last.pt or a train.py checkpoint): SiT, EMA and "
        "projectors; a train.py checkpoint's args set model, encoder, depth, path, ... unless flags say otherwise",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- ``--config`` <- the flags given on the command line."""
    given = {k: v for k, v in vars(args).items() if k in FIELD_NAMES}
    if given.get("init_from") and not given.get("resume"):
        from .official import official_train_settings

        # the checkpoint's settings sit between --config and the flags
        given = {**official_train_settings(given["init_from"]), **given}
    return resolve_config(getattr(args, "config", None), given)

