"""Video REPA: per-frame encoder targets grouped to a video VAE's latent frames, and 3D token grids.

A video diffusion transformer sees a clip of T pixel frames through a video VAE that compresses
time: Wan, CogVideoX and HunyuanVideo encode the first frame alone and then each group of 4
frames into one latent frame (T = 1 + 4 n frames -> 1 + n latent frames); LTX-Video does the
same with groups of 8. The model then patchifies the latent video into a (t, h, w) token grid.

`repa` runs any registry image encoder on the B*T clean frames (``frame_chunk`` frames per
call, so memory stays bounded), groups its per-frame tokens the way the VAE groups frames
(mean within a group by default, or one picked frame), and aligns the result with the model's
(t, h, w) tokens, resampling in time and space where the grids differ::

    reg = REPARegularizer(wan_transformer, layers=7, encoders="dinov2-vit-b")   # preset: grid, factor 4
    pred = wan_transformer(latents_t, t, text).sample                           # hooks capture blocks.7
    loss = diffusion_loss + reg(videos)       # clean videos (B, C, T, H, W) or (B, T, C, H, W)

Nothing here imports a video library; reading video folders lives in :mod:`repa.video_cache`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import ConfigError, ShapeMismatchError
from .grid import AnyGrid, format_grid, infer_grid

__all__ = [
    "VIDEO_OPTION_KEYS",
    "FRAME_POOLING",
    "VideoOptions",
    "VideoGridTracker",
    "detect_video_layout",
    "to_frames_first",
    "latent_frame_groups",
    "num_latent_frames",
    "group_frame_tokens",
    "encode_video_targets",
    "video_feature_targets",
    "is_video_call",
]

logger = logging.getLogger("repa")

#: REPARegularizer keyword options handled here.
VIDEO_OPTION_KEYS = ("video_layout", "temporal_compression", "frame_pooling", "frame_chunk")
#: How the frames of one latent-frame group become one target: the mean, or one picked frame.
FRAME_POOLING = ("mean", "first", "middle", "last")
_LAYOUTS = ("BCTHW", "BTCHW")


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class VideoOptions:
    """The regularizer's video settings.

    Attributes:
        video_layout: ``"BCTHW"`` or ``"BTCHW"``: the layout of clean videos passed to
            ``reg(videos)``; ``None`` detects it from the channel axis (1 or 3 channels) and
            refuses ambiguous shapes.
        temporal_compression: frames per latent frame of the video VAE after the first
            (Wan/CogVideoX/HunyuanVideo: 4, LTX-Video: 8); ``None`` takes the model preset's.
        frame_pooling: ``"mean"`` (default) averages the targets of a group's frames;
            ``"first"``, ``"middle"`` or ``"last"`` keeps one frame's (and encodes only those).
        frame_chunk: frames per encoder call (bounds the encoder's activation memory).
    """

    video_layout: Optional[str] = None
    temporal_compression: Optional[int] = None
    frame_pooling: str = "mean"
    frame_chunk: int = 64

    def __post_init__(self) -> None:
        if self.video_layout is not None:
            layout = str(self.video_layout).upper()
            if layout not in _LAYOUTS:
                raise ConfigError(
                    f"video_layout must be 'BCTHW' (B, C, T, H, W) or 'BTCHW' (B, T, C, H, W), got {self.video_layout!r}"
                )
            object.__setattr__(self, "video_layout", layout)
        k = self.temporal_compression
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"temporal_compression must be a positive int (4 for Wan, 8 for LTX-Video), got {k!r}")
        if self.frame_pooling not in FRAME_POOLING:
            raise ConfigError(f"frame_pooling must be one of {list(FRAME_POOLING)}, got {self.frame_pooling!r}")
        c = self.frame_chunk
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigError(f"frame_chunk must be a positive int (frames per encoder call), got {c!r}")

    @classmethod
    def pop_from(cls, options: Dict[str, Any]) -> VideoOptions:
        """Take the video keywords out of a regularizer's ``**options``."""
        kwargs = {k: options.pop(k) for k in VIDEO_OPTION_KEYS if k in options and options[k] is not None}
        return cls(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        """The non-default settings, for the regularizer's saved config."""
        out: Dict[str, Any] = {}
        if self.video_layout is not None:
            out["video_layout"] = self.video_layout
        if self.temporal_compression is not None:
            out["temporal_compression"] = self.temporal_compression
        if self.frame_pooling != "mean":
            out["frame_pooling"] = self.frame_pooling
        if self.frame_chunk != 64:
            out["frame_chunk"] = self.frame_chunk
        return out


# --------------------------------------------------------------------------- layouts and groups
def detect_video_layout(videos: torch.Tensor, layout: Optional[str] = None) -> str:
    """``"BCTHW"`` or ``"BTCHW"`` for a 5-D video batch, checked against ``layout`` when given.

    Detection looks for the colour axis (1 or 3 channels) at position 1 or 2; a shape where
    both or neither qualify (e.g. 3 frames of RGB) is refused with the fix.
    """
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5:
        raise ShapeMismatchError(
            "videos must be a 5-D tensor (B, C, T, H, W) or (B, T, C, H, W), got "
            f"{tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__}"
        )
    shape = tuple(videos.shape)
    if layout is not None:
        channels = shape[1] if layout == "BCTHW" else shape[2]
        if channels not in (1, 3):
            raise ShapeMismatchError(
                f"video_layout={layout!r} reads {channels} colour channels from videos of shape {shape}; "
                "expected 1 or 3: fix video_layout= or permute the videos"
            )
        return layout
    c_first, c_second = shape[1] in (1, 3), shape[2] in (1, 3)
    if c_first and not c_second:
        return "BCTHW"
    if c_second and not c_first:
        return "BTCHW"
    raise ShapeMismatchError(
        f"cannot tell the layout of videos of shape {shape}: pass REPARegularizer(..., "
        "video_layout='BCTHW') for (B, C, T, H, W) or video_layout='BTCHW' for (B, T, C, H, W)"
    )


def to_frames_first(videos: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, C, T, H, W) or (B, T, C, H, W) -> (B, T, C, H, W) (a view where possible)."""
    return videos.transpose(1, 2) if layout == "BCTHW" else videos


def num_latent_frames(num_frames: int, temporal_compression: int) -> int:
    """Latent frames of a causal video VAE: 1 + (T - 1) / k; T must be 1 + k * n."""
    return len(latent_frame_groups(num_frames, temporal_compression))


def latent_frame_groups(num_frames: int, temporal_compression: int) -> List[List[int]]:
    """The pixel frames behind each latent frame: ``[[0], [1..k], [k+1..2k], ...]``.

    The causal video VAEs of Wan, CogVideoX, HunyuanVideo (k = 4) and LTX-Video (k = 8)
    encode the first frame alone and then each run of k frames, so a clip has 1 + k * n frames.
    """
    k = int(temporal_compression)
    if num_frames < 1 or (num_frames - 1) % k != 0:
        fits = 1 + k * max((num_frames - 1) // k, 0)
        raise ShapeMismatchError(
            f"a clip of {num_frames} frames does not fit a video VAE with temporal compression {k}: it "
            f"needs 1 + {k} * n frames (e.g. {fits} or {fits + k}); trim or pad the clip, or pass "
            "temporal_compression= for another VAE"
        )
    return [[0]] + [list(range(1 + k * i, 1 + k * (i + 1))) for i in range((num_frames - 1) // k)]


def _picked(group: Sequence[int], pooling: str) -> List[int]:
    if pooling == "mean":
        return list(group)
    index = {"first": 0, "middle": (len(group) - 1) // 2, "last": len(group) - 1}[pooling]
    return [group[index]]


def group_frame_tokens(tokens: torch.Tensor, temporal_compression: int, pooling: str = "mean") -> torch.Tensor:
    """Per-frame tokens (B, T, N, D) -> per-latent-frame tokens (B, T_lat, N, D).

    ``pooling="mean"`` averages each group's frames; ``"first"``/``"middle"``/``"last"`` keep one.
    """
    groups = latent_frame_groups(tokens.shape[1], temporal_compression)
    out = [tokens[:, _picked(g, pooling)].mean(dim=1) for g in groups]  # each (B, N, D)
    return torch.stack(out, dim=1)  # (B, T_lat, N, D)


# --------------------------------------------------------------------------- targets
def is_video_call(images: Any, features: Any, encoder_dims: Sequence[int]) -> bool:
    """Whether ``reg(images)`` / ``reg(features=...)`` carries a video batch.

    Videos are 5-D; precomputed video targets are (B, T_lat, N, D) tensors whose last axis is
    the encoder width (a 2-D feature map (B, D, h, w) has the width on axis 1 instead).
    """
    if isinstance(images, torch.Tensor):
        return images.ndim == 5
    tensors: List[Any]
    if isinstance(features, torch.Tensor):
        tensors = [features]
    elif isinstance(features, Mapping):
        tensors = list(features.values())
    elif isinstance(features, (list, tuple)):
        tensors = list(features)
    else:
        return False
    for t, dim in zip(tensors, encoder_dims):
        if isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[-1] == dim and t.shape[1] != dim:
            return True
    return False


def _resolve_compression(reg: Any, num_frames: int) -> int:
    k = reg.video.temporal_compression
    if k is None and reg._grid_tracker is not None:
        k = reg._grid_tracker.temporal_compression
    if k is None:
        raise ConfigError(
            f"videos of {num_frames} frames need the video VAE's temporal compression to group frames into "
            "latent frames: pass REPARegularizer(..., temporal_compression=4) (Wan, CogVideoX, HunyuanVideo) or 8 "
            "(LTX-Video), or 1 if every frame is its own latent frame"
        )
    return int(k)


def encode_video_targets(reg: Any, videos: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, AnyGrid]]:
    """Per-latent-frame targets of every encoder: name -> ((B, T_lat*h_e*w_e, D_e) fp32, (T_lat, h_e, w_e)).

    Runs the encoders on the clean frames ``frame_chunk`` at a time through the regularizer's
    own image path (range check, normalization, encoder grid), then groups the frames.
    """
    layout = detect_video_layout(videos, reg.video.video_layout)
    frames = to_frames_first(videos, layout)  # (B, T, C, H, W)
    b, t = frames.shape[:2]
    k = _resolve_compression(reg, t)
    groups = latent_frame_groups(t, k)
    pooling = reg.video.frame_pooling
    # each encoded frame adds weight * its tokens into its latent frame: memory stays at one
    # chunk of frames plus the (B, T_lat, N, D) result, whatever T is
    latent_of: Dict[int, Tuple[int, float]] = {}
    for j, g in enumerate(groups):
        picked = _picked(g, pooling)
        for f in picked:
            latent_of[f] = (j, 1.0 / len(picked))
    needed = sorted(latent_of)
    chunk = max(1, reg.video.frame_chunk // max(b, 1))  # frames of every clip per encoder call
    sums: Dict[str, torch.Tensor] = {}
    grids: Dict[str, Any] = {}
    for start in range(0, len(needed), chunk):
        idx = needed[start : start + chunk]
        batch = frames[:, idx].reshape(b * len(idx), *frames.shape[2:])  # (B*n, C, H, W)
        for name, (y, grid) in reg._targets(batch, None, {}).items():
            y = y.reshape(b, len(idx), *y.shape[1:])  # (B, n, N, D) fp32
            if name not in sums:
                sums[name] = y.new_zeros(b, len(groups), *y.shape[2:])  # (B, T_lat, N, D)
                grids[name] = grid
            dest = torch.tensor([latent_of[f][0] for f in idx], device=y.device)
            weight = torch.tensor([latent_of[f][1] for f in idx], device=y.device, dtype=y.dtype)
            sums[name].index_add_(1, dest, y * weight.view(1, -1, 1, 1))
    result: Dict[str, Tuple[torch.Tensor, AnyGrid]] = {}
    for name, pooled in sums.items():
        h, w = grids[name]
        result[name] = (pooled.reshape(b, len(groups) * h * w, -1), (len(groups), h, w))
    return result


def video_feature_targets(reg: Any, features: Any) -> Dict[str, Tuple[torch.Tensor, AnyGrid]]:
    """Precomputed per-latent-frame targets (B, T_lat, N_e, D_e) (e.g. from a video cache) as flat tokens."""
    raw = reg._features_by_encoder(features)
    if reg.check_inputs:  # the regularizer's own check of precomputed targets (NaN/Inf name the encoder)
        from .inputs import check_finite_features

        check_finite_features(raw)
    out: Dict[str, Tuple[torch.Tensor, AnyGrid]] = {}
    for name, dim in zip(reg.encoder_names, reg.encoder_dims):
        y = raw[name]
        if not isinstance(y, torch.Tensor) or y.ndim != 4 or y.shape[-1] != dim:
            raise ShapeMismatchError(
                f"video targets of encoder {name!r} must be (B, T_lat, N, {dim}), got "
                f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
            )
        y = y.detach().float()
        b, t, n, d = y.shape
        h, w = infer_grid(n, what=f"tokens per latent frame of encoder {name!r}")
        if reg.target_norm == "zscore":
            from .losses import zscore_targets

            y = zscore_targets(y.reshape(b * t, n, d), reg.alpha).reshape(b, t, n, d)
        out[name] = (y.reshape(b, t * n, d), (t, h, w))
    return out


# --------------------------------------------------------------------------- grids from the model input
class VideoGridTracker:
    """Records the (t, h, w) token grid of each model forward from its input, by a forward pre-hook.

    ``read(args, kwargs) -> (t, h, w) | None`` is the model family's rule (patch sizes from its
    config, latent sizes from the input's shape). The grid is recorded only for forwards the
    regularizer captures (grad enabled, capture not disabled), so an EMA or sampling forward in
    between cannot replace it.
    """

    def __init__(self, model: nn.Module, read: Any, temporal_compression: Optional[int] = None) -> None:
        self.read = read
        self.temporal_compression = temporal_compression
        self.grid: Optional[Tuple[int, int, int]] = None
        self.owner: Any = None
        try:
            self._signature: Optional[inspect.Signature] = inspect.signature(model.forward)
        except (TypeError, ValueError):  # pragma: no cover - builtin forward
            self._signature = None
        self._model = [model]
        self._handle = model.register_forward_pre_hook(_GridHook(self), with_kwargs=True)

    def _record(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        owner = self.owner
        if owner is not None and not owner._capture_enabled:
            return
        if not torch.is_grad_enabled():
            return
        bound: Dict[str, Any] = dict(kwargs)
        if self._signature is not None:
            try:
                bound = dict(self._signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                pass
        grid = self.read(self._model[0], bound)
        self.grid = tuple(int(v) for v in grid) if grid is not None else None  # type: ignore[assignment]

    def remove(self) -> None:
        """Remove the pre-hook. Idempotent."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __repr__(self) -> str:
        g = format_grid(self.grid) if self.grid else None
        return f"VideoGridTracker(grid={g}, temporal_compression={self.temporal_compression})"


class _GridHook:
    """The pre-hook object; a deep copy of the model (an EMA copy) carries an inert one."""

    def __init__(self, tracker: Optional[VideoGridTracker]) -> None:
        self.tracker = tracker

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker._record(module, args, kwargs)

    def __deepcopy__(self, memo: Dict[int, Any]) -> _GridHook:
        return _GridHook(None)

    def __reduce__(self):
        return (_GridHook, (None,))
