"""The VAE of a latent diffusion model as REPA's teacher (SRA^2, Wang et al., arXiv 2601.17830).

    reg = REPARegularizer(model, layers=3, encoders=vae)          # a diffusers AutoencoderKL
    loss = diffusion_loss + reg(images)                           # its encoder's features, frozen

A latent diffusion run already holds a frozen VAE. SRA^2 aligns an early block of the diffusion
transformer, through a light projector, with the VAE encoder's features of the clean image and
reports REPA-like gains for about 4% extra compute, with no external encoder. This adapter turns
an ``AutoencoderKL`` into an encoder ``REPARegularizer`` accepts (``encoders=vae`` is wrapped
automatically): images in [0, 1] are mapped to the VAE's [-1, 1] and encoded under no_grad.

``features``: ``"latent"`` (default) is the posterior mean (B, latent_channels, h, w), the
latent a latent-diffusion run already computes or caches (so ``reg(features=moments[:, :c])``
gives the same targets with no VAE call); ``"encoder"`` is the encoder's last hidden map before
its output convolution (after the final norm and SiLU), (B, block_out_channels[-1], h, w),
wider and richer than the latent.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Union

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["VAEEncoder", "is_autoencoder_kl", "VAE_FEATURES"]

VAE_FEATURES = ("latent", "encoder")


def is_autoencoder_kl(obj: Any) -> bool:
    """True for a diffusers ``AutoencoderKL`` (checked by its parts, without importing diffusers)."""
    return (
        isinstance(obj, nn.Module)
        and hasattr(obj, "encoder")
        and hasattr(obj, "encode")
        and hasattr(getattr(obj, "config", None), "latent_channels")
    )


class VAEEncoder(nn.Module):
    """A frozen ``AutoencoderKL``'s encoder as a REPA target encoder: images (B, C, H, W) in [0, 1] -> (B, D, h, w).

    Args:
        vae: a diffusers ``AutoencoderKL`` (local weights; nothing is downloaded).
        features: ``"latent"`` (posterior mean) or ``"encoder"`` (last hidden map of the encoder).
    """

    def __init__(self, vae: nn.Module, features: str = "latent") -> None:
        super().__init__()
        if not is_autoencoder_kl(vae):
            raise ConfigError(f"VAEEncoder needs a diffusers AutoencoderKL, got {type(vae).__name__}")
        if features not in VAE_FEATURES:
            raise ConfigError(f"features={features!r} is not a VAE feature; choose from {list(VAE_FEATURES)}")
        self.vae: Any = vae.eval().requires_grad_(False)  # duck-typed AutoencoderKL (diffusers not imported)
        self.features = features
        cfg: Any = self.vae.config
        self.in_channels = int(getattr(cfg, "in_channels", 3))
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.embed_dim = int(cfg.latent_channels if features == "latent" else cfg.block_out_channels[-1])
        self.name = f"vae-{features}"

    def train(self, mode: bool = True) -> VAEEncoder:
        """Always eval: the teacher is frozen."""
        return super().train(False)

    def grid(self, image_size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
        """The (h, w) feature grid for an image size."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return (h // self.downsample, w // self.downsample)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * 2.0 - 1.0  # (B, C, H, W) in [-1, 1], the VAE's range
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        param = next(self.vae.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        if self.features == "latent":
            return self.vae.encode(x).latent_dist.mean.float()  # (B, c, h, w)
        captured: Dict[str, torch.Tensor] = {}
        handle = self.vae.encoder.conv_act.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out))
        try:
            self.vae.encoder(x)
        finally:
            handle.remove()
        return captured["h"].float()  # (B, block_out_channels[-1], h, w)
