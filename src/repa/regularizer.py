"""REPARegularizer: REPA as one added line in any diffusion training loop.

    reg = REPARegularizer(model, layers="blocks.7", encoders="dinov2-vit-b")
    ...
    pred = model(x_t, t, y)                      # forward hooks capture blocks.7's output
    loss = F.mse_loss(pred, target) + reg(x)     # x: the clean images

The pipeline of one call: captured hidden states (B, N, D) -> image-token selection ->
projector (B, N, D_e) -> alignment loss against the frozen encoder's patch tokens of the
clean images (B, N_e, D_e), resampled to the model's grid when they differ -> mean over
(layer, encoder) pairs -> times ``weight(step)``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .base import HookedObjective
from .capture import LayersLike, infer_model_dim, resolve_layers, unwrap_model
from .config import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    REPAConfig,
    check_input_range,
    check_mismatch,
    check_resample,
    check_target_norm,
    read_saved_config,
)
from .errors import ConfigError, GridMismatchError, REPAError, ShapeMismatchError, StateDictError
from .grid import (
    AnyGrid,
    Grid,
    as_grid,
    as_token_grid,
    flatten_feature_map,
    format_grid,
    grid_cells,
    infer_grid,
    resample_tokens,
)
from .inputs import check_finite_features, check_nonempty, features_by_encoder, matching_image_size, normalize_images
from .losses import build_loss, loss_option_keys, mean_cosine_similarity, zscore_targets
from .presets import ModelPreset, preset_for
from .projectors import build_projector
from .schedules import WeightLike
from .video import VIDEO_OPTION_KEYS, VideoOptions, encode_video_targets, is_video_call, video_feature_targets

__all__ = ["REPARegularizer", "REPAOutput", "CONFIG_NAME", "WEIGHTS_NAME"]

EncoderLike = Union[str, nn.Module, Callable[[torch.Tensor], torch.Tensor], int]


def _option_keys() -> List[str]:
    """Keyword options of the pieces accepted as constructor keywords (losses registered later included)."""
    return ["kernel_size", "target_norm", "alpha", *loss_option_keys(), *VIDEO_OPTION_KEYS]


class REPAOutput(NamedTuple):
    """What ``reg(..., return_breakdown=True)`` returns.

    Attributes:
        total: ``weight * loss``, the term to add to the diffusion loss (scalar, with grad).
        loss: the unweighted alignment loss, mean over (layer, encoder) pairs.
        weight: the weight used at this step.
        cosine: mean cosine similarity per pair, keyed ``"layer/encoder"`` (detached scalars).
    """

    total: torch.Tensor
    loss: torch.Tensor
    weight: float
    cosine: Dict[str, torch.Tensor]


class _FeatureOnlyEncoder:
    """Stands in for an encoder whose targets always come precomputed (``features=``)."""

    def __init__(self, name: str, embed_dim: int) -> None:
        self.name = name
        self.embed_dim = embed_dim

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise ConfigError(
            f"encoder {self.name!r} was given as a width only ({self.embed_dim}); it cannot encode images. "
            "Pass its targets with reg(features=...), or pass the encoder itself"
        )


def _freeze(encoder: Any) -> Any:
    if isinstance(encoder, nn.Module):
        encoder.eval()
        encoder.requires_grad_(False)
    return encoder


def _encoder_dim(encoder: Any, name: str) -> int:
    for attr in ("embed_dim", "num_features", "out_dim"):
        value = getattr(encoder, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    try:  # one probe forward on a blank 224px image
        device = next(encoder.parameters()).device if isinstance(encoder, nn.Module) else "cpu"
        with torch.no_grad():
            out = encoder(torch.zeros(1, 3, 224, 224, device=device))
    except Exception as exc:
        raise ConfigError(
            f"cannot find the output width of encoder {name!r}: it has no embed_dim attribute and a probe "
            f"forward on a (1, 3, 224, 224) image failed ({exc}); set encoder.embed_dim = <int>"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim not in (3, 4):
        raise ConfigError(f"encoder {name!r} must return tokens (B, N, D) or a feature map (B, D, h, w)")
    return int(out.shape[-1] if out.ndim == 3 else out.shape[1])


def _is_vae(encoder: Any) -> bool:
    from .encoders.vae import is_autoencoder_kl

    return is_autoencoder_kl(encoder)


def _default_name(encoder: Any) -> str:
    name = getattr(encoder, "name", None)
    if isinstance(name, str) and name:
        return name
    return type(encoder).__name__.lower()


def _per_layer(value: Any, layer: str, what: str, layers: Sequence[str]) -> Any:
    """Pick a layer's entry from a dict option, or return the shared value."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(layers))
        if unknown:
            raise ConfigError(f"{what} has entries for unknown layers {unknown}; hooked layers are {list(layers)}")
        return value.get(layer)
    return value


def _model_dim_alias(model_dim: Any, options: Dict[str, Any]) -> Any:
    """``model_dim``, or the value of its deprecated name ``hidden_dim`` (0.1.0) popped from ``options``."""
    if "hidden_dim" not in options:
        return model_dim
    if model_dim is not None:
        raise ConfigError("pass model_dim= only (hidden_dim= is its deprecated name), not both")
    warnings.warn(
        "REPARegularizer(hidden_dim=...) is deprecated; pass model_dim=... (the hooked layers' width)",
        DeprecationWarning,
        stacklevel=3,
    )
    return options.pop("hidden_dim")


class REPARegularizer(HookedObjective):
    """Representation alignment (REPA) as a regularizer attached to any model by forward hooks.

    Args:
        model: the diffusion model (may be wrapped in DDP or ``torch.compile`` later; attach
            before compiling).
        layers: which outputs to align: a module name as ``model.named_modules()`` prints it
            (``"blocks.7"``), a regex, an int into the model's block list (0-based:
            REPA's ``--encoder-depth 8`` is ``layers=7``), or a list of these.
        encoders: a registry name (``"dinov2-vit-b"``), any ``nn.Module``/callable mapping float
            images (B, 3, H, W) in [0, 1] to tokens (B, N, D) or a feature map (B, D, h, w), an
            int (the width of targets that always come precomputed via ``features=``), or a
            list / dict (name -> encoder) of these. Encoders are frozen and never part of
            ``parameters()`` or ``state_dict()``.
        weight: lambda (REPA: 0.5), a schedule from :mod:`repa.schedules` or ``step -> float``.
        projector: ``"mlp"`` (REPA), ``"linear"``, ``"conv"`` (iREPA) or ``(in, out) -> nn.Module``.
        projector_dim: hidden width of the MLP projector (REPA: 2048).
        loss: ``"cosine"`` (REPA), ``"nt-xent"``, ``"smooth-l1"``, ``"mse"``, ``"vf"``,
            ``"relation"``, ``"trd"`` (VideoREPA) or ``(pred, target) -> scalar``.
        tokens: which tokens of a hooked output are image tokens: ``None`` (all, or the model
            preset's choice), a slice, a callable on the raw output, or a dict layer -> one of these.
        grid: the model's token grid ``(h, w)``, or ``(t, h, w)`` for video tokens (or a dict
            layer -> grid); inferred when square; video presets read it from each forward's input.
        mismatch: ``"interpolate"`` resamples when model and encoder grids differ, ``"error"``
            raises :class:`~repa.errors.GridMismatchError`.
        input_range: the range of float images passed to the call, e.g. ``(-1, 1)``.
        model_dim: width of the hooked outputs (int or dict layer -> int) when it cannot be
            inferred from the hooked module's parameters. ``hidden_dim=`` is its deprecated
            name (0.1.0).
        encoder_kwargs: keywords for :func:`repa.encoders.create_encoder` (registry names).
        resample: ``"target"`` (resample encoder tokens to the model grid) or ``"model"``
            (resample projected model tokens to the encoder grid, as U-REPA does).
        check_inputs: check each call that float images lie in ``input_range`` and are finite,
            and that ``features=`` targets are finite (one host sync per call); ``False`` skips
            these checks on the hot path.
        **options: options of the pieces: ``kernel_size`` (conv projector), ``temperature``
            (nt-xent), ``beta`` (smooth-l1), ``margin_cos``/``margin_dist`` (vf),
            ``target_norm="zscore"`` and ``alpha`` (iREPA spatial target normalization),
            ``margin``/``relation_chunk`` (trd), and for videos ``video_layout``,
            ``temporal_compression``, ``frame_pooling``, ``frame_chunk`` (:class:`repa.video.VideoOptions`).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayersLike,
        encoders: Union[EncoderLike, Sequence[EncoderLike], Dict[str, EncoderLike]] = "dinov2-vit-b",
        *,
        weight: WeightLike = 0.5,
        projector: Union[str, Callable[[int, int], nn.Module]] = "mlp",
        projector_dim: int = 2048,
        loss: Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = "cosine",
        tokens: Any = None,
        grid: Any = None,
        mismatch: str = "interpolate",
        input_range: Tuple[float, float] = (0.0, 1.0),
        model_dim: Union[int, Dict[str, int], None] = None,
        encoder_kwargs: Optional[Dict[str, Any]] = None,
        resample: Optional[str] = None,
        check_inputs: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        model_dim = _model_dim_alias(model_dim, options)
        unknown = sorted(set(options) - set(_option_keys()))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; REPARegularizer accepts {_option_keys()}")
        check_mismatch(mismatch)
        lo, hi = check_input_range(input_range)
        target_norm = options.pop("target_norm", None)
        check_target_norm(target_norm)
        alpha = float(options.pop("alpha", 0.6))
        kernel_size = options.pop("kernel_size", None)
        self.video = VideoOptions.pop_from(options)  # video_layout, temporal_compression, ... (repa.video)
        loss_options = {k: options.pop(k) for k in list(options)}

        base = unwrap_model(model)
        self._preset: Optional[ModelPreset] = preset_for(base)
        resample = resample or (self._preset.resample if self._preset else "target")
        check_resample(resample)

        blocks = self._preset.blocks(base) if self._preset else None
        resolved = resolve_layers(base, layers, blocks=blocks)
        self.layer_names: List[str] = [name for name, _ in resolved]
        self._setup_weight(weight)

        # encoders: frozen, held outside the module tree (never in parameters/state_dict/DDP)
        enc_list, self.encoder_names = self._build_encoders(encoders, encoder_kwargs or {})
        self._encoders: List[Any] = enc_list
        self.encoder_dims: List[int] = [_encoder_dim(e, n) for e, n in zip(enc_list, self.encoder_names)]

        self.model_dims: Dict[str, int] = self._resolve_model_dims(resolved, model_dim, base)

        self.pairs: List[Tuple[str, str]] = [(ly, e) for ly in self.layer_names for e in self.encoder_names]
        self.projectors = nn.ModuleList(
            build_projector(
                projector,
                self.model_dims[layer],
                self.encoder_dims[self.encoder_names.index(enc)],
                projector_dim=projector_dim,
                kernel_size=kernel_size,
            )
            for layer, enc in self.pairs
        )
        self.loss_fn = build_loss(loss, loss_options)

        self._tokens = {n: self._token_selector(tokens, n, base) for n in self.layer_names}
        self._setup_grids(grid, base)
        self.mismatch = mismatch
        self.resample = resample
        self.input_range = (lo, hi)
        self.target_norm = target_norm
        self.alpha = alpha
        self.check_inputs = check_inputs
        self._config = REPAConfig(
            layers=list(self.layer_names),
            encoders=list(self.encoder_names),
            encoder_dims=list(self.encoder_dims),
            model_dims=dict(self.model_dims),
            weight=self._weight_config(weight),
            projector=projector if isinstance(projector, str) else None,
            projector_dim=projector_dim,
            loss=loss if isinstance(loss, str) else None,
            grid={n: list(g) for n, g in self._grids.items() if g is not None} or None,
            mismatch=mismatch,
            input_range=[lo, hi],
            resample=resample,
            options={
                k: v
                for k, v in {
                    "target_norm": target_norm, "alpha": alpha, "kernel_size": kernel_size, **loss_options,
                    **self.video.to_dict(),
                }.items()
                if v is not None
            },
        )

        # capture state (plain attributes: not module state), shared with the other objectives
        self._setup_capture(model, base, resolved)

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _build_encoders(encoders: Any, kwargs: Dict[str, Any]) -> Tuple[List[Any], List[str]]:
        if isinstance(encoders, dict):
            items = list(encoders.items())
        elif isinstance(encoders, (list, tuple)):
            items = [(None, e) for e in encoders]
        else:
            items = [(None, encoders)]
        if not items:
            raise ConfigError("encoders= is empty; pass at least one encoder, e.g. encoders='dinov2-vit-b'")
        built: List[Any] = []
        names: List[str] = []
        for key, enc in items:
            if isinstance(enc, str):
                from .encoders import create_encoder

                name = key or enc
                enc = create_encoder(enc, **kwargs)
            elif isinstance(enc, int) and not isinstance(enc, bool):
                name = key or f"encoder{len(built)}"
                enc = _FeatureOnlyEncoder(name, enc)
            elif _is_vae(enc):  # a diffusers AutoencoderKL: its encoder's features (SRA^2)
                from .encoders.vae import VAEEncoder

                enc = VAEEncoder(enc)
                name = key or enc.name
            elif callable(enc):
                name = key or _default_name(enc)
            else:
                raise ConfigError(
                    f"encoders entries must be registry names, nn.Modules, callables or ints (feature widths), "
                    f"got {enc!r} ({type(enc).__name__})"
                )
            base, i = name, 1
            while name in names:
                i += 1
                name = f"{base}_{i}"
            built.append(_freeze(enc))
            names.append(name)
        return built, names

    def _resolve_model_dims(
        self, resolved: Sequence[Tuple[str, nn.Module]], model_dim: Any, base: nn.Module
    ) -> Dict[str, int]:
        """Each hooked layer's width: ``model_dim=`` if given, else the preset's, else inferred."""
        dims: Dict[str, int] = {}
        for name, module in resolved:
            dim = _per_layer(model_dim, name, "model_dim", self.layer_names)
            if dim is None and self._preset and self._preset.hidden_dim:
                dim = self._preset.hidden_dim(base, name)
            dims[name] = int(dim) if dim is not None else infer_model_dim(module, name)
        return dims

    def _setup_grids(self, grid: Any, base: nn.Module) -> None:
        """Each layer's token grid from ``grid=`` (or None: inferred per call), and a video preset's tracker."""
        self._grids: Dict[str, Optional[AnyGrid]] = {}
        for n in self.layer_names:
            g = _per_layer(grid, n, "grid", self.layer_names)
            self._grids[n] = as_token_grid(g) if g is not None else None
        # video presets record each forward's (t, h, w) token grid from the model's input
        self._grid_tracker = self._preset.video(base) if self._preset and self._preset.video else None
        if self._grid_tracker is not None:
            self._grid_tracker.owner = self

    def _token_selector(self, tokens: Any, layer: str, base: nn.Module) -> Any:
        sel = _per_layer(tokens, layer, "tokens", self.layer_names)
        if sel is None and self._preset and self._preset.tokens:
            sel = self._preset.tokens(base, layer)
        if sel is not None and not isinstance(sel, slice) and not callable(sel):
            raise ConfigError(f"tokens must be None, a slice or a callable (or a dict layer -> one), got {sel!r}")
        return sel

    # ------------------------------------------------------------------ public properties
    @property
    def repa_config(self) -> REPAConfig:
        """The regularizer's settings as a :class:`~repa.config.REPAConfig` (a copy)."""
        return REPAConfig(**self._config.to_dict())

    @property
    def hidden_dims(self) -> Dict[str, int]:
        """Deprecated name (0.1.0) of :attr:`model_dims`, the hooked layers' widths."""
        warnings.warn("reg.hidden_dims is deprecated; use reg.model_dims", DeprecationWarning, stacklevel=2)
        return self.model_dims

    @property
    def encoders(self) -> List[Any]:
        """The frozen encoders, in the order of :attr:`encoder_names`."""
        return list(self._encoders)

    # ------------------------------------------------------------------ capture lifecycle
    def _on_remove(self) -> None:
        """Also remove the hooks of token selectors (older Flux) and of a video preset's grid tracker."""
        for selector in self._tokens.values():
            if callable(getattr(selector, "remove", None)):
                selector.remove()
        if self._grid_tracker is not None:
            self._grid_tracker.remove()

    def attach_to(self, model: nn.Module, name: str = "repa_projectors") -> nn.Module:
        """Register the projectors as a submodule of ``model``.

        For setups that wrap, shard, checkpoint or average ONE module (FSDP, accelerate, EMA):
        the projectors then travel with the model. Use only ``model.parameters()`` in the
        optimizer afterwards (they already include the projectors).
        """
        target = unwrap_model(model)
        existing = getattr(target, name, None)
        if existing is self.projectors:
            return model
        if existing is not None:
            raise ConfigError(f"{type(target).__name__} already has an attribute {name!r}; pass another name=")
        target.add_module(name, self.projectors)
        return model

    # ------------------------------------------------------------------ the call
    def forward(
        self,
        images: Optional[torch.Tensor] = None,
        *,
        features: Any = None,
        step: Optional[int] = None,
        return_breakdown: bool = False,
    ) -> Union[torch.Tensor, REPAOutput]:
        """Alignment loss for the hidden states captured in the last model forward.

        Args:
            images: the CLEAN images of the batch, uint8 in [0, 255] or float in
                ``input_range``, (B, C, H, W); or clean videos (B, C, T, H, W) / (B, T, C, H, W)
                for video models (see :mod:`repa.video`).
            features: precomputed encoder targets instead of ``images``: a tensor (one
                encoder), a list (in encoder order) or a dict keyed by encoder name; each
                (B, N_e, D_e) or (B, D_e, h, w).
            step: use this step for the weight schedule (the counter then continues from it).
            return_breakdown: return a :class:`REPAOutput` instead of the weighted scalar.

        Returns:
            ``weight * alignment_loss``, a scalar with gradients into the model's blocks up to
            the hooked ones and into the projectors.
        """
        captures = self._take_captures()
        weight = self._advance(step)

        if weight == 0.0:
            # skip encoder and projectors; the zero still touches every projector parameter so
            # DDP sees no unused parameters once a stop schedule fires
            zero = self._zero()
            return REPAOutput(zero, zero.detach(), 0.0, {}) if return_breakdown else zero

        targets = self._targets(images, features, captures)
        losses, cosines = [], {}
        for (layer, enc_name), projector in zip(self.pairs, self.projectors):
            hidden, grid_m = self._hidden_tokens(layer, captures[layer])  # (B, N, D)
            target, grid_e = targets[enc_name]  # (B, N_e, D_e)
            if hidden.shape[0] != target.shape[0]:
                raise ShapeMismatchError(
                    f"layer {layer!r} captured a batch of {hidden.shape[0]} but encoder {enc_name!r} targets have "
                    f"batch {target.shape[0]}: pass the clean images of exactly the batch the model just ran on"
                )
            pred = projector(hidden, grid_m) if getattr(projector, "uses_grid", False) else projector(hidden)
            if grid_m != grid_e:
                if self.mismatch == "error":
                    raise GridMismatchError(self._mismatch_message(layer, enc_name, grid_m, grid_e, images))
                if self.resample == "target":
                    target = resample_tokens(target, grid_e, grid_m)
                else:
                    pred = resample_tokens(pred, grid_m, grid_e)
            losses.append(self.loss_fn(pred, target))
            if return_breakdown:  # logging only: keep it off the plain training call
                cosines[f"{layer}/{enc_name}"] = mean_cosine_similarity(pred.detach(), target)
        loss = torch.stack([term.float() for term in losses]).mean()
        total = weight * loss
        if return_breakdown:
            return REPAOutput(total, loss.detach(), weight, cosines)
        return total

    # ------------------------------------------------------------------ pieces of the call
    def _hidden_tokens(self, layer: str, output: Any) -> Tuple[torch.Tensor, AnyGrid]:
        sel = self._tokens[layer]
        if callable(sel):
            x = sel(output)
        else:
            x = output
            if isinstance(x, (tuple, list)):
                x = x[0]
            elif not isinstance(x, torch.Tensor) and hasattr(x, "sample"):
                x = x.sample
        if not isinstance(x, torch.Tensor):
            raise ShapeMismatchError(
                f"layer {layer!r} returned {type(x).__name__}, not a tensor; pass tokens=<callable output -> tensor>"
            )
        grid = self._grids[layer]
        if grid is None and self._grid_tracker is not None:
            grid = self._grid_tracker.grid  # (t, h, w) of the forward that produced this capture
        if x.ndim == 4:  # (B, C, H, W) conv / U-Net features
            x, grid4 = flatten_feature_map(x)  # (B, H*W, C)
            if isinstance(sel, slice):
                raise ConfigError(f"tokens=slice(...) does not apply to the (B, C, H, W) output of layer {layer!r}")
            grid = grid or grid4
        elif x.ndim != 3:
            raise ShapeMismatchError(
                f"layer {layer!r} output has shape {tuple(x.shape)}; expected tokens (B, N, D) or a feature map "
                "(B, C, H, W). Pass tokens=<callable> to extract them"
            )
        if isinstance(sel, slice):
            x = x[:, sel]  # (B, N_img, D)
        check_nonempty(x, f"the output of layer {layer!r}")
        n = x.shape[1]
        if grid is None:
            grid = infer_grid(n, what=f"tokens from layer {layer!r}")
        elif grid_cells(grid) != n:
            raise ShapeMismatchError(
                f"grid={grid} of layer {layer!r} has {grid_cells(grid)} cells but the layer gives {n} image tokens; "
                "fix grid= (video: (t, h, w) after patching) or tokens="
            )
        if x.shape[-1] != self.model_dims[layer]:
            raise ShapeMismatchError(
                f"layer {layer!r} gives width {x.shape[-1]} but its projector expects {self.model_dims[layer]}; "
                f"pass model_dim={x.shape[-1]}"
            )
        return x, grid

    def _normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, self.input_range, self.check_inputs)

    def _features_by_encoder(self, features: Any) -> Dict[str, torch.Tensor]:
        return features_by_encoder(features, self.encoder_names)

    def _targets(self, images: Any, features: Any, captures: Dict[str, Any]) -> Dict[str, Tuple[torch.Tensor, AnyGrid]]:
        if (images is None) == (features is None):
            raise ConfigError("pass exactly one of images= (clean images) or features= (precomputed targets)")
        if is_video_call(images, features, self.encoder_dims):  # (B, C, T, H, W) clips: repa.video
            return encode_video_targets(self, images) if features is None else video_feature_targets(self, features)
        out: Dict[str, Tuple[torch.Tensor, AnyGrid]] = {}
        if features is not None:
            raw = self._features_by_encoder(features)
            image_size = None
            if self.check_inputs:
                check_finite_features(raw)
        else:
            x = self._normalize_images(images)
            image_size = tuple(x.shape[-2:])
            raw = {}
            for enc, name in zip(self._encoders, self.encoder_names):
                if isinstance(enc, nn.Module):
                    param = next(enc.parameters(), None)
                    if param is not None and param.device != x.device:
                        enc.to(x.device)
                with torch.no_grad():
                    raw[name] = enc(x)
        for enc, name, dim in zip(self._encoders, self.encoder_names, self.encoder_dims):
            y = raw[name]
            if not isinstance(y, torch.Tensor) or y.ndim not in (3, 4):
                raise ShapeMismatchError(
                    f"targets of encoder {name!r} must be (B, N, D) tokens or a (B, D, h, w) map, got "
                    f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
                )
            y = y.detach()
            check_nonempty(y, f"targets of encoder {name!r}")
            if y.ndim == 4:
                if y.shape[1] != dim:
                    raise ShapeMismatchError(f"encoder {name!r} feature map has {y.shape[1]} channels, expected {dim}")
                y, grid = flatten_feature_map(y)
            else:
                if y.shape[-1] != dim:
                    raise ShapeMismatchError(
                        f"targets of encoder {name!r} have width {y.shape[-1]}, expected {dim} (shape {tuple(y.shape)})"
                    )
                told: Optional[Grid] = None  # the encoder's own grid() for this image size, if it fits
                if image_size is not None and hasattr(enc, "grid"):
                    g = as_grid(enc.grid(image_size))
                    told = g if g[0] * g[1] == y.shape[1] else None
                grid = told or infer_grid(y.shape[1], what=f"target tokens of encoder {name!r}")
            y = y.float()
            if self.target_norm == "zscore":
                y = zscore_targets(y, self.alpha)
            out[name] = (y, grid)
        return out

    def _mismatch_message(self, layer: str, enc_name: str, grid_m: AnyGrid, grid_e: AnyGrid, images: Any) -> str:
        msg = (
            f"layer {layer!r} has a {format_grid(grid_m)} token grid but encoder {enc_name!r} gives "
            f"{format_grid(grid_e)}"
        )
        if isinstance(images, torch.Tensor) and images.ndim == 4 and len(grid_m) == 2 and len(grid_e) == 2:
            size = (int(images.shape[-2]), int(images.shape[-1]))
            msg += f" for {size[0]}x{size[1]} images"
            enc = self._encoders[self.encoder_names.index(enc_name)]
            fit = matching_image_size(enc, images, (grid_e[0], grid_e[1]), (grid_m[0], grid_m[1]))
            if fit is not None:
                msg += f"; images of {fit[0]}x{fit[1]} would give the encoder a matching grid"
        return msg + "; pass mismatch='interpolate' to resample the targets instead"

    # ------------------------------------------------------------------ save / load
    @classmethod
    def from_pretrained(
        cls,
        directory: Union[str, os.PathLike],
        model: nn.Module,
        encoders: Any = None,
        **overrides: Any,
    ) -> REPARegularizer:
        """Rebuild a regularizer saved by :meth:`save_pretrained` on ``model`` and load it strictly.

        ``encoders`` defaults to the saved registry names; pass modules when the saved ones were
        custom. ``overrides`` replace saved constructor arguments (e.g. a callable ``weight=``).
        The config is ``repa_config.json`` (or, when that file is missing, the copy in the
        weights file's metadata).

        Raises:
            ConfigError: the saved config is not valid JSON, lacks fields or holds values of the
                wrong type (the message names them).
            StateDictError: the folder holds no saved regularizer, the weights file is damaged,
                or its tensors are missing, extra, of another shape or not finite.
        """
        from safetensors.torch import load_file

        weights_path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(weights_path):
            raise StateDictError(f"no {WEIGHTS_NAME} in {str(directory)!r}; save one with reg.save_pretrained(dir)")
        config_path = os.path.join(directory, CONFIG_NAME)
        config = read_saved_config(config_path, weights_path)
        try:
            state = load_file(weights_path)
        except Exception as exc:  # SafetensorError (bad header, truncated), OSError
            raise StateDictError(
                f"cannot read {weights_path!r} ({type(exc).__name__}: {exc}); the file is damaged: save the "
                "regularizer again with reg.save_pretrained(dir)"
            ) from exc
        broken = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
        if broken:
            raise StateDictError(f"{weights_path!r} holds NaN or infinite values in {broken}; the file is damaged")
        try:
            kwargs = config.to_kwargs()
        except REPAError:
            raise
        except (TypeError, ValueError) as exc:  # e.g. a schedule object with unknown fields
            raise ConfigError(f"{config_path!r} holds an invalid setting ({exc}); save the regularizer again") from exc
        if "hidden_dim" in overrides:  # the name of 0.1.0 replaces the saved widths
            kwargs.pop("model_dim")
        kwargs.update(overrides)
        for key in ("weight", "projector", "loss"):
            if kwargs.get(key) is None:
                raise ConfigError(f"the saved regularizer used a custom {key}; pass {key}=... to from_pretrained")
        if encoders is None:
            encoders = dict(zip(config.encoders, config.encoders))
        try:
            reg = cls(model, config.layers, encoders, **kwargs)
        except REPAError:
            raise
        except (TypeError, ValueError, KeyError) as exc:  # a value of the right type that the pieces reject
            raise ConfigError(
                f"the settings in {config_path!r} (with overrides {sorted(overrides)}) cannot build a regularizer "
                f"({type(exc).__name__}: {exc}); save it again with reg.save_pretrained(dir)"
            ) from exc
        try:  # on failure, leave the model without this regularizer's hooks
            if reg.encoder_dims != config.encoder_dims:
                raise StateDictError(
                    f"encoder widths {reg.encoder_dims} differ from the saved {config.encoder_dims} "
                    f"(encoders {config.encoders}); pass the encoders the projectors were trained with"
                )
            reg.load_state_dict(state)
        except BaseException:
            reg.remove()
            raise
        return reg

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        """Load projectors and step; with ``strict`` a mismatch names missing and unexpected keys."""
        if strict:
            own = set(self.state_dict())
            missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
            if missing or unexpected:
                raise StateDictError(
                    f"state dict does not match this regularizer: missing keys {missing}, unexpected keys "
                    f"{unexpected}; was it saved with the same layers, encoders and projector?"
                )
        own_state = self.state_dict()
        reshaped = [
            f"{k}: saved {tuple(v.shape)}, here {tuple(own_state[k].shape)}"
            for k, v in state_dict.items()
            if k in own_state and isinstance(v, torch.Tensor) and v.shape != own_state[k].shape
        ]
        if reshaped:
            raise StateDictError(
                f"state dict tensors have other shapes than this regularizer's: {reshaped}; was it saved with the "
                "same layers, encoders, projector and projector_dim?"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return (
            f"layers={self.layer_names}, encoders={self.encoder_names}, loss={self._config.loss}, "
            f"mismatch={self.mismatch!r}, step={self._step}"
        )
