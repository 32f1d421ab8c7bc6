"""`FrozenEncoder`: a registry network wrapped as REPA's target encoder.

It takes the images the regularizer is given (uint8 0-255 or float in [0, 1], any size),
preprocesses them exactly as its :class:`~repa.encoders.EncoderSpec` says, runs the network
without gradients and returns float32 patch tokens (B, N, D), prefix tokens dropped. It stays in
eval mode even when a parent module calls ``.train()`` (REPA's reference left MAE and I-JEPA in
train mode: its issue #45).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ShapeMismatchError
from .spec import EncoderSpec, ImageSize, _pair

__all__ = ["FrozenEncoder"]


class FrozenEncoder(nn.Module):
    """A frozen encoder: images -> patch tokens, preprocessing included.

    Args:
        model: the network; its ``state_dict()`` is the weights file.
        spec: the registry entry describing preprocessing and the target.
        resolution: the training-image size R (or (H, W)) this encoder serves; the default of
            :meth:`grid` and :meth:`input_size`. Images of another size still work: the resize
            rule is applied to the size of each batch, so the grid follows the image.
        dtype: compute dtype of the network (``torch.bfloat16``/``torch.float16`` halve memory
            and time on GPUs); the output is float32 whatever it is.
        compile: wrap the token extraction in ``torch.compile``.

    Attributes:
        name, embed_dim, patch_size, spec, model, resolution: as in the encoder contract.
    """

    mean: torch.Tensor  # (1, C, 1, 1) buffer
    std: torch.Tensor  # (1, C, 1, 1) buffer

    def __init__(
        self,
        model: nn.Module,
        spec: EncoderSpec,
        *,
        resolution: ImageSize = 256,
        dtype: Optional[torch.dtype] = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.model: Any = model  # a timm network or any module with the spec's extraction method
        self.spec = spec
        self.name: str = spec.name
        self.embed_dim: int = spec.embed_dim
        self.patch_size: int = spec.patch_size
        self.resolution: Tuple[int, int] = _pair(resolution, "resolution")
        if dtype is not None:
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ConfigError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
            self.model.to(dtype)
        shape = (1, spec.in_chans, 1, 1)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(shape), persistent=False)
        self.requires_grad_(False)
        super().train(False)
        self._extract = torch.compile(self._tokens) if compile else self._tokens

    # ------------------------------------------------------------------ frozen by construction
    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode: a frozen target encoder never uses dropout or batch statistics."""
        return super().train(False)

    # ------------------------------------------------------------------ geometry
    def input_size(self, image_size: Optional[ImageSize] = None) -> Tuple[int, int]:
        """The network's input (H, W) for images of ``image_size`` (default: ``resolution``)."""
        return self.spec.encoder_input_size(self.resolution if image_size is None else image_size)

    def grid(self, image_size: Optional[ImageSize] = None) -> Tuple[int, int]:
        """Token grid (h, w) returned for images of ``image_size`` (default: ``resolution``)."""
        return self.spec.grid(self.resolution if image_size is None else image_size)

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 / [0, 1] images (B, C, H, W) -> normalized, resized float32 network input."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ShapeMismatchError(f"encoder {self.name!r} expects images (B, C, H, W), got {got}")
        if images.dtype == torch.uint8:
            x = images.float() / 255.0  # (B, C, H, W) in [0, 1]
        elif images.is_floating_point():
            x = images.float()
        else:
            raise ConfigError(
                f"encoder {self.name!r} expects uint8 (0-255) or float ([0, 1]) images, got {images.dtype}"
            )
        c, want = x.shape[1], self.spec.in_chans
        if c != want:
            if c == 1 and want == 3:
                x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB
            else:
                raise ShapeMismatchError(
                    f"encoder {self.name!r} expects {want}-channel images, got {c} channels (shape {tuple(x.shape)})"
                )
        x = x.to(self.mean.device)
        size = self.spec.encoder_input_size(tuple(x.shape[-2:]))
        if self.spec.normalize_first:
            x = self._resize(self._normalize(x), size)
        else:
            x = self._normalize(self._resize(x, size))
        return x  # (B, C, H_in, W_in)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def _resize(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        kwargs: dict = {"mode": self.spec.interpolation}
        if self.spec.interpolation in ("bicubic", "bilinear"):
            kwargs.update(align_corners=False, antialias=self.spec.antialias)
        return F.interpolate(x, size=size, **kwargs)

    # ------------------------------------------------------------------ forward
    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Network input (B, C, H, W) -> patch tokens (B, N, D) in the network's dtype."""
        if self.spec.extract == "vit":
            # the last block's output, with or without the final norm; timm drops prefix tokens
            (tokens,) = self.model.forward_intermediates(
                x, indices=1, norm=self.spec.final_norm, output_fmt="NLC", intermediates_only=True
            )
            return tokens  # (B, N, D)
        out = self.model(x)
        if isinstance(out, torch.Tensor) and out.ndim == 4:  # (B, D, h, w) feature map
            return out.flatten(2).transpose(1, 2)  # (B, h*w, D)
        if not isinstance(out, torch.Tensor) or out.ndim != 3:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ShapeMismatchError(
                f"encoder {self.name!r}: the network must return tokens (B, N, D) or a map (B, D, h, w), got {got}"
            )
        return out[:, self.spec.prefix_tokens:]  # (B, N, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), uint8 or float in [0, 1] -> float32 patch tokens (B, N, D)."""
        x = self.preprocess(images)
        param = next(self.model.parameters(), None)
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            tokens = self._extract(x)  # (B, N, D)
        if tokens.shape[-1] != self.embed_dim:
            raise ShapeMismatchError(
                f"encoder {self.name!r} returned width {tokens.shape[-1]} but its spec says embed_dim={self.embed_dim}"
            )
        return tokens.float()

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"name={s.name!r}, embed_dim={s.embed_dim}, patch_size={s.patch_size}, "
            f"input={s.resize_rule}, grid@{self.resolution[0]}={self.grid()}, "
            f"target={'final-norm' if s.final_norm else 'pre-norm'}"
        )

    def __getstate__(self) -> Any:  # picklable even when compiled
        state = self.__dict__.copy()
        state.pop("_extract", None)
        return state

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state)
        self._extract = self._tokens
