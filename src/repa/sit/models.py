"""SiT: the Scalable Interpolant Transformer that REPA regularizes (REPA_FACTS section 3).

A DiT-style transformer over patch tokens that predicts the velocity of a stochastic
interpolant (SiT paper, arXiv 2401.08740; DiT paper, arXiv 2212.09748):

    x (B, C, H, W) --patchify--> tokens (B, N, D) + fixed 2D sin-cos position embedding
    c = MLP(sinusoid(t)) + label_embedding(y)                      # (B, D)
    depth x SiTBlock(tokens, c)   (adaLN-Zero: shift/scale/gate from c, zero-initialized)
    final adaLN + Linear --unpatchify--> velocity (B, C, H, W)

The blocks live in ``self.blocks`` (an ``nn.ModuleList``): REPA's "encoder depth 8" is the
output of the 8th block, i.e. module ``"blocks.7"`` (REPA_FACTS section 2). Every block
returns tokens (B, N, D), so ``REPARegularizer(model, layers="blocks.7", ...)`` hooks it directly.

Module and parameter names follow the layout of the reference implementation
(``x_embedder.proj``, ``t_embedder.mlp``, ``y_embedder.embedding_table``, ``blocks.i.attn.qkv``,
``blocks.i.mlp.fc1``, ``blocks.i.adaLN_modulation.1``, ``final_layer.linear``, ``pos_embed``),
so state dicts map onto it by name (the reference also stores its projectors in the model).

Sizes (depth / width / heads): S 12/384/6, B 12/768/12, L 24/1024/16, XL 28/1152/16, with patch
2, 4 or 8: ``create_sit("SiT-XL/2")``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import ConfigError, ShapeMismatchError, UnknownNameError

__all__ = [
    "SiT",
    "SiTBlock",
    "SiT_models",
    "create_sit",
    "list_sit_models",
    "timestep_embedding",
    "sincos_pos_embed_2d",
]


# --------------------------------------------------------------------------------------------
# Fixed embeddings
# --------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a continuous time, (B,) -> (B, dim), computed in float32.

    Frequencies f_k = max_period^(-k / (dim/2)), k = 0 .. dim/2 - 1; the output is
    ``[cos(t f_k) for k] ++ [sin(t f_k) for k]`` (GLIDE / DiT convention). SiT and REPA feed
    t in [0, 1] directly, without rescaling to [0, 1000].
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)  # (dim/2,)
    freqs = torch.exp(-math.log(max_period) * k / half)  # (dim/2,)
    args = t.float()[:, None] * freqs[None, :]  # (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*(dim/2))
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


def _sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """1D sin-cos features of integer positions, (M,) -> (M, dim) as ``[sin(p w_k)] ++ [cos(p w_k)]``.

    w_k = 10000^(-k / (dim/2)), k = 0 .. dim/2 - 1 (MAE / DiT convention), computed in float64.
    """
    k = torch.arange(dim // 2, dtype=torch.float64, device=pos.device)  # (dim/2,)
    omega = 1.0 / 10000.0 ** (k / (dim / 2))  # (dim/2,)
    args = pos.double()[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (M, dim)


def sincos_pos_embed_2d(dim: int, grid: Tuple[int, int], device: Optional[torch.device] = None) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of an (h, w) token grid, returns (h*w, dim) float32.

    Tokens are in row-major order (token n sits at row n // w, column n % w, the order of the
    patch convolution's flattened output). The first dim/2 features encode the COLUMN, the last
    dim/2 the ROW, each with :func:`_sincos_1d` (the layout of the MAE/DiT/SiT reference, so
    their checkpoints' ``pos_embed`` matches). ``dim`` must be divisible by 4. Works for any
    grid, e.g. the 7x7 grid of a 28x28 image with patch 4.
    """
    if dim % 4 != 0:
        raise ConfigError(
            f"2D sin-cos position embedding needs a width divisible by 4, got hidden_size={dim}; "
            "choose a hidden_size that is a multiple of 4"
        )
    h, w = grid
    rows = torch.arange(h, device=device).repeat_interleave(w)  # (h*w,) row of token n
    cols = torch.arange(w, device=device).repeat(h)  # (h*w,) column of token n
    emb = torch.cat([_sincos_1d(cols, dim // 2), _sincos_1d(rows, dim // 2)], dim=1)  # (h*w, dim)
    return emb.float()


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, with (B, D) conditioning broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (B, N, D)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: (B, C, H, W) -> (B, N, D), N = (H/p)(W/p), row-major."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): 256 sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, 256) float32
        weight_dtype = self.mlp[0].weight.dtype
        return self.mlp(freq.to(weight_dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class label y (B,) -> (B, D), with an extra row ``num_classes`` for the null (unconditional) label.

    Label dropout for classifier-free guidance: in training mode each label is replaced by the
    null label with probability ``dropout_prob``; ``force_drop_ids`` (B,) (1 = drop) overrides
    the random choice in any mode. The null row always exists, so ``y == num_classes`` is a
    valid input (what the guided samplers pass).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def drop_labels(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replace dropped labels by the null label ``num_classes``."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (B,)
        else:
            drop = force_drop_ids == 1  # (B,)
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)  # (B,)

    def forward(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is not None or (self.training and self.dropout_prob > 0):
            labels = self.drop_labels(labels, force_drop_ids)  # (B,)
        return self.embedding_table(labels)  # (B, D)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim with a learned gain: x / rms(x) * g."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.float().pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()  # (..., 1)
        return (x.float() * rms).to(x.dtype) * self.weight


QKNorm = Union[bool, str]
_QK_NORMS: Dict[str, Callable[[int], nn.Module]] = {
    # eps 1e-5, PyTorch's default, as in the reference (timm's Attention builds its q/k norms
    # with nn.LayerNorm's defaults)
    "layernorm": lambda dim: nn.LayerNorm(dim, eps=1e-5),
    "rmsnorm": lambda dim: RMSNorm(dim),
}


def _qk_norm_layer(qk_norm: QKNorm, head_dim: int) -> nn.Module:
    """The per-head norm applied to q and k: identity (False), LayerNorm (True / "layernorm") or RMSNorm."""
    if qk_norm is False or qk_norm is None:
        return nn.Identity()
    name = "layernorm" if qk_norm is True else qk_norm
    if name not in _QK_NORMS:
        raise ConfigError(
            f"qk_norm={qk_norm!r} is not supported; use False, True (LayerNorm), "
            f"or one of {sorted(_QK_NORMS)}"
        )
    return _QK_NORMS[name](head_dim)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``, optional qk-norm per head."""

    def __init__(self, dim: int, num_heads: int, qk_norm: QKNorm = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ConfigError(
                f"hidden_size={dim} is not divisible by num_heads={num_heads}; "
                "pick num_heads that divides hidden_size"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = _qk_norm_layer(qk_norm, self.head_dim)
        self.k_norm = _qk_norm_layer(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        out = out.transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return self.proj(out)  # (B, N, D)


class Mlp(nn.Module):
    """Linear(D, r D) -> GELU(tanh) -> Linear(r D, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: (B, N, D), (B, D) -> (B, N, D).

    c -> (shift, scale, gate) for the attention and the MLP branch; the gates start at zero
    (the modulation Linear is zero-initialized), so every block starts as the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: QKNorm = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(c)  # (B, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)  # 6 x (B, D)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))  # (B, N, D)
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear to p*p*out_channels values per token: (B, N, D) -> (B, N, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x (B, D)
        x = modulate(self.norm_final(x), shift, scale)  # (B, N, D)
        return self.linear(x)  # (B, N, p*p*C_out)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class SiT(nn.Module):
    """Class-conditional SiT predicting the interpolant velocity.

    Args:
        input_size: height = width of the input (latent 32 for ImageNet 256; 28 for Fashion-MNIST).
        patch_size: side of a square patch; must divide ``input_size``.
        in_channels: input channels (4 for SD-VAE latents, 1 for Fashion-MNIST pixels).
        hidden_size, depth, num_heads, mlp_ratio: transformer size.
        class_dropout_prob: probability of replacing a label by the null label in training (CFG).
        num_classes: number of real classes; label ``num_classes`` is the null class.
        learn_sigma: if True the last layer has 2 * in_channels outputs as in DiT/SiT's
            released configs; the extra half is discarded, so the output is always (B, C, H, W).
        qk_norm: False, True / "layernorm", or "rmsnorm": norm q and k per head before attention.

    ``forward(x (B, C, H, W), t (B,) in [0, 1], y (B,) long) -> velocity (B, C, H, W)``.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        qk_norm: QKNorm = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size != 0:
            raise ConfigError(
                f"input_size={input_size} is not divisible by patch_size={patch_size}; "
                "use a patch size that divides the input size (e.g. 28 with patch 2 or 4)"
            )
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ConfigError(f"class_dropout_prob={class_dropout_prob} must lie in [0, 1]")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grid = (input_size // patch_size, input_size // patch_size)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed (not trained) position embedding, kept in the state dict like the reference's.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid).unsqueeze(0))  # (1, N, D)
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialization: xavier-uniform Linears with zero bias, the patch conv like a Linear,
        N(0, 0.02) label table and timestep MLP, and zero adaLN modulations and output layer
        (adaLN-Zero: every block starts as the identity and the model outputs zeros)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        conv = self.x_embedder.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, p*p*C) -> image (B, C, H, W); token n fills patch (n // w, n % w)."""
        h, w = self.grid
        p = self.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)  # (B, C, H, W)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ShapeMismatchError(
                f"SiT expects x of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), got "
                f"{tuple(x.shape)}; build the model with matching in_channels / input_size"
            )
        b = x.shape[0]
        if t.ndim == 0:
            t = t.expand(b)
        if tuple(t.shape) != (b,):
            raise ShapeMismatchError(f"SiT expects t of shape ({b},) or a scalar, got {tuple(t.shape)}")
        if tuple(y.shape) != (b,):
            raise ShapeMismatchError(f"SiT expects labels y of shape ({b},), got {tuple(y.shape)}")
        return t

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Optional[torch.Tensor],
        force_drop_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Velocity prediction.

        Args:
            x: (B, C, H, W) interpolant x_t.
            t: (B,) times in [0, 1] (t = 1 is pure noise) or a scalar.
            y: (B,) long class labels in [0, num_classes]; ``num_classes`` is the null label;
                None means the null label for every sample (unconditional).
            force_drop_ids: optional (B,) with 1 where the label is replaced by the null label.
        """
        if y is None:  # unconditional: every sample gets the null label
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)  # (B,)
        t = self._check_inputs(x, t, y)
        tokens = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)  # (B, N, D)
        out = self.final_layer(tokens, c)  # (B, N, p*p*C_out)
        out = self.unpatchify(out)  # (B, C_out, H, W)
        if self.learn_sigma:
            out = out[:, : self.in_channels]  # (B, C, H, W): the velocity half
        return out

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
    ) -> torch.Tensor:
        """Classifier-free guided velocity v_u + cfg_scale * (v_c - v_u) in one doubled batch.

        Runs ``forward`` on ``[x, x]`` with labels ``[y, null]`` (null = ``num_classes``), so the
        output (B, C, H, W) is the conditional velocity when ``cfg_scale == 1``. For guidance only
        inside a time interval use :func:`repa.sit.sampling.sample`.
        """
        b = x.shape[0]
        t = t.expand(b) if t.ndim == 0 else t
        null = torch.full_like(y, self.num_classes)  # (B,)
        v = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C, H, W)
        v_cond, v_uncond = v.chunk(2)  # 2 x (B, C, H, W)
        return v_uncond + cfg_scale * (v_cond - v_uncond)  # (B, C, H, W)


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

_SIZES: Dict[str, Tuple[int, int, int]] = {  # name -> (depth, hidden_size, num_heads)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def _factory(depth: int, hidden_size: int, num_heads: int, patch_size: int) -> Callable[..., SiT]:
    def build(**kwargs) -> SiT:
        config = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)
        config.update(kwargs)
        return SiT(**config)

    return build


#: "SiT-{S,B,L,XL}/{2,4,8}" -> factory(**overrides) -> SiT.
SiT_models: Dict[str, Callable[..., SiT]] = {
    f"SiT-{size}/{patch}": _factory(*_SIZES[size], patch)
    for size in ("S", "B", "L", "XL")
    for patch in (2, 4, 8)
}


def list_sit_models() -> list:
    """Names accepted by :func:`create_sit`."""
    return list(SiT_models)


def create_sit(name: str, **overrides) -> SiT:
    """Build a SiT by size name, e.g. ``create_sit("SiT-B/2", input_size=28, in_channels=1, num_classes=10)``.

    ``overrides`` are :class:`SiT` arguments (they may also replace the size's depth, width,
    heads or patch). Raises :class:`UnknownNameError` for an unknown name.
    """
    if name not in SiT_models:
        raise UnknownNameError(
            f"unknown SiT model {name!r}; valid names are {', '.join(SiT_models)}"
        )
    return SiT_models[name](**overrides)
