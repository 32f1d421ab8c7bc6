"""SRA, Self-Representation Alignment (Jiang et al., arXiv 2505.02831): the model's own EMA as teacher.

    sra = SelfAlignmentRegularizer(model, ema_model, student_layer=3, teacher_layer=7)
    opt = torch.optim.AdamW([*model.parameters(), *sra.parameters()], lr=1e-4)
    pred = model(x_t, t, y)                                 # hooks capture the student block
    t_lo = sra.teacher_time(t)                              # a lower noise level, t - U(0, 0.2)
    x_lo = (1 - t_lo) * x + t_lo * noise                    # the same image and noise at t_lo
    loss = F.mse_loss(pred, target) + sra(x_lo, t_lo, y)    # runs ema_model(x_lo, t_lo, y), no grad

The student's earlier block, at the training noise level, goes through a small projector and
is aligned with the EMA model's later block at a lower noise level of the same image. No
external encoder: the teacher is the EMA copy every diffusion run already keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional, Union

import torch
from torch import nn

from .base import HookedObjective
from .capture import LayersLike, infer_model_dim, resolve_layers, unwrap_model
from .config import settings_from_dict, settings_kwargs
from .errors import CaptureError, ConfigError, ShapeMismatchError
from .losses import build_loss, mean_cosine_similarity
from .projectors import build_projector, list_projectors
from .schedules import WeightLike

__all__ = ["SelfAlignmentRegularizer", "SelfAlignmentOutput", "SelfAlignmentConfig", "SRAProjector"]


def _check_max_gap(max_gap: Any) -> float:
    if isinstance(max_gap, bool) or not isinstance(max_gap, (int, float)) or not 0.0 <= max_gap <= 1.0:
        raise ConfigError(f"max_gap must lie in [0, 1], got {max_gap!r} (the paper uses 0.2)")
    return float(max_gap)


@dataclass
class SelfAlignmentConfig:
    """The settings of a :class:`SelfAlignmentRegularizer` (``sra.config``, ``sra_config.json``).

    ``weight``, ``loss`` and ``projector`` are None where a callable was passed (not saveable).
    """

    student_layer: str
    teacher_layer: str
    hidden_dim: int
    teacher_dim: int
    weight: Any = 0.2
    loss: Optional[str] = "smooth-l1"
    beta: float = 0.05
    projector: Optional[str] = "sra"
    projector_dim: int = 2048
    max_gap: float = 0.2
    objective: str = "sra"

    def __post_init__(self) -> None:
        self.max_gap = _check_max_gap(self.max_gap)
        self.beta = float(self.beta)
        for name in ("hidden_dim", "teacher_dim", "projector_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")


class SelfAlignmentOutput(NamedTuple):
    """What ``sra(..., return_breakdown=True)`` returns.

    Attributes:
        total: ``weight * loss`` (scalar, with grad into the student and the projector).
        loss: the unweighted alignment loss (detached).
        weight: the weight used at this step.
        cosine: mean cosine similarity between projected student and teacher tokens (detached).
    """

    total: torch.Tensor
    loss: torch.Tensor
    weight: float
    cosine: torch.Tensor


class SRAProjector(nn.Sequential):
    """SRA's head: Linear(D, D + D_t) -> SiLU -> Linear(D + D_t, D_t)."""

    uses_grid = False

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, in_dim + out_dim), nn.SiLU(), nn.Linear(in_dim + out_dim, out_dim))


class _TeacherHook:
    """Stores the teacher block's output while the owner runs the teacher; inert when deep-copied."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        owner = self.owner
        if owner is not None and owner._teacher_running:
            owner._teacher_out = output

    def __deepcopy__(self, memo: Dict[int, Any]) -> _TeacherHook:
        return _TeacherHook(None)


def _tokens_of(output: Any, what: str) -> torch.Tensor:
    x = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(x, torch.Tensor):
        raise ShapeMismatchError(f"{what} returned {type(x).__name__}, not a tensor")
    if x.ndim == 4:  # (B, C, H, W) conv features -> (B, H*W, C)
        x = x.flatten(2).transpose(1, 2)
    if x.ndim != 3:
        raise ShapeMismatchError(
            f"{what} gives shape {tuple(x.shape)}; expected tokens (B, N, D) or a map (B, C, H, W)"
        )
    return x


class SelfAlignmentRegularizer(HookedObjective):
    """SRA: align the student's earlier block with its EMA teacher's later block at lower noise.

    The paper (Jiang et al., arXiv 2505.02831; official code vvvvvjdy/SRA): the student block's
    output at time t goes through a projector (Linear(D, D + D_t) -> SiLU -> Linear(D + D_t,
    D_t), ``projector="sra"``) and is aligned with the EMA model's (eval mode, no grad) output of
    a later block for the same image, noise and (dropped) labels at t_teacher = clamp(t - U(0,
    t_max), 0, 1), t_max = 0.2 (their "dynamic interval"; :meth:`teacher_time`). Loss:
    smooth-L1 with beta 0.05, mean over elements (the paper's; their code now suggests
    ``loss="cosine"`` with weight 0.5). Depths (1-based, as in the paper): student 8 / teacher
    20 for SiT-XL/2, 4 / 8 for SiT-B/2 (``student_layer=7, teacher_layer=19`` here, 0-based).
    Weight: the paper scales the smooth-L1 term by 0.2 (and decays it further late in
    training); the default here is that 0.2, constant. EMA decay 0.9999 as in REPA.

    The EMA model is held by reference (not a submodule: not in ``parameters()`` or
    ``state_dict()``), set to ``requires_grad_(False)``, hooked on ``teacher_layer`` only and
    run under ``torch.no_grad()`` by the call; its captures never mix with the student's.
    While the weight schedule is 0 the teacher forward is skipped (a zero touching the projector
    is returned, DDP-safe).

    Args:
        model: the student (the model being trained).
        ema_model: its EMA copy (e.g. ``EMA(...)["model"]`` or ``copy.deepcopy(model)``).
        student_layer, teacher_layer: one layer each: a module name, a regex or an int into the
            block list (0-based).
        weight: the loss weight, a schedule or ``step -> float``.
        loss: ``"smooth-l1"`` (paper), ``"cosine"``, ``"mse"``, ... (names of :mod:`repa.losses`) or
            ``(pred, target) -> scalar``; ``beta`` for smooth-L1 (paper: 0.05).
        projector: ``"sra"`` (paper), ``"mlp"``, ``"linear"`` or ``(in, out) -> nn.Module``.
        max_gap: t_max of :meth:`teacher_time` (paper: 0.2).
        hidden_dim, teacher_dim: widths when they cannot be inferred from the hooked modules.
    """

    CONFIG_NAME = "sra_config.json"
    WEIGHTS_NAME = "sra_projector.safetensors"

    def __init__(
        self,
        model: nn.Module,
        ema_model: nn.Module,
        student_layer: LayersLike,
        teacher_layer: LayersLike,
        *,
        weight: WeightLike = 0.2,
        loss: Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = "smooth-l1",
        beta: float = 0.05,
        projector: Union[str, Callable[[int, int], nn.Module]] = "sra",
        projector_dim: int = 2048,
        max_gap: float = 0.2,
        hidden_dim: Optional[int] = None,
        teacher_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if ema_model is model or unwrap_model(ema_model) is unwrap_model(model):
            raise ConfigError("ema_model is the student model itself; pass its EMA copy (e.g. copy.deepcopy(model))")
        _check_max_gap(max_gap)
        base = unwrap_model(model)
        teacher = unwrap_model(ema_model)
        student = resolve_layers(base, student_layer)
        teacher_mod = resolve_layers(teacher, teacher_layer)
        if len(student) != 1 or len(teacher_mod) != 1:
            raise ConfigError(
                f"SRA aligns one student layer with one teacher layer; {student_layer!r} resolves to "
                f"{[n for n, _ in student]} and {teacher_layer!r} to {[n for n, _ in teacher_mod]}"
            )
        self._setup_weight(weight)
        self._setup_capture(model, base, student)
        self.student_layer = student[0][0]
        self.teacher_layer = teacher_mod[0][0]
        self.hidden_dim = (
            int(hidden_dim) if hidden_dim else infer_model_dim(student[0][1], self.student_layer, "hidden_dim")
        )
        self.teacher_dim = (
            int(teacher_dim) if teacher_dim else infer_model_dim(teacher_mod[0][1], self.teacher_layer, "teacher_dim")
        )
        self.projector: nn.Module
        if projector == "sra":
            self.projector = SRAProjector(self.hidden_dim, self.teacher_dim)
        elif isinstance(projector, str) and projector.lower() not in list_projectors():
            raise ConfigError(
                f"unknown projector {projector!r}; choose from {['sra', *list_projectors()]} or a callable"
            )
        else:
            self.projector = build_projector(projector, self.hidden_dim, self.teacher_dim, projector_dim=projector_dim)
        if getattr(self.projector, "uses_grid", False):
            raise ConfigError("SRA takes token-wise projectors only ('sra', 'mlp', 'linear' or a callable)")
        loss_options = {"beta": beta} if loss == "smooth-l1" else {}
        self.loss_fn = build_loss(loss, loss_options)
        self.max_gap = float(max_gap)

        ema_model.requires_grad_(False)  # the teacher is never trained by the optimizer
        self._teacher_ref = [ema_model]  # a list: not a submodule, not in state_dict
        self._teacher_running = False
        self._teacher_out: Any = None
        self._teacher_handle: Optional[Any] = teacher_mod[0][1].register_forward_hook(_TeacherHook(self))
        self.teacher_calls = 0  # forwards of the teacher run by this regularizer
        self._config = SelfAlignmentConfig(
            student_layer=self.student_layer,
            teacher_layer=self.teacher_layer,
            hidden_dim=self.hidden_dim,
            teacher_dim=self.teacher_dim,
            weight=self._weight_config(weight),
            loss=loss if isinstance(loss, str) else None,
            beta=float(beta),
            projector=projector if isinstance(projector, str) else None,
            projector_dim=projector_dim,
            max_gap=self.max_gap,
        )

    def _call_name(self) -> str:
        return "sra"

    def _on_remove(self) -> None:
        if self._teacher_handle is not None:
            self._teacher_handle.remove()
            self._teacher_handle = None

    @property
    def ema_model(self) -> nn.Module:
        """The teacher (held by reference)."""
        return self._teacher_ref[0]

    def teacher_time(self, t: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """SRA's teacher time: clamp(t - max_gap * U(0, 1), 0, 1), one draw per sample (t = 1 is noise)."""
        u = torch.rand(t.shape, generator=generator, device=t.device, dtype=torch.float32)
        return (t - self.max_gap * u.to(t.dtype)).clamp(0.0, 1.0)

    def forward(
        self,
        *teacher_args: Any,
        step: Optional[int] = None,
        return_breakdown: bool = False,
        **teacher_kwargs: Any,
    ) -> Union[torch.Tensor, SelfAlignmentOutput]:
        """Run the teacher on its (lower-noise) inputs and align the captured student block with it.

        Args:
            *teacher_args, **teacher_kwargs: the EMA model's forward arguments, e.g.
                ``(x_lo, t_lo, y)`` and ``force_drop_ids=drop`` (the same image, noise and
                dropped labels as the student, at the teacher's time).
            step: use this step for the weight schedule (the counter then continues from it).
            return_breakdown: return a :class:`SelfAlignmentOutput`.
        """
        captures = self._take_captures()
        weight = self._advance(step)
        if weight == 0.0:  # the teacher forward is skipped entirely
            zero = self._zero()
            return SelfAlignmentOutput(zero, zero.detach(), 0.0, zero.detach()) if return_breakdown else zero
        student = _tokens_of(captures[self.student_layer], f"student layer {self.student_layer!r}")  # (B, N, D)
        teacher = self._run_teacher(teacher_args, teacher_kwargs)  # (B, N, D_t)
        if student.shape[:2] != teacher.shape[:2]:
            raise ShapeMismatchError(
                f"student layer {self.student_layer!r} gives {tuple(student.shape)} but teacher layer "
                f"{self.teacher_layer!r} gives {tuple(teacher.shape)}: pass the teacher the same batch and resolution"
            )
        if student.shape[-1] != self.hidden_dim:
            raise ShapeMismatchError(
                f"student layer {self.student_layer!r} has width {student.shape[-1]}, expected {self.hidden_dim}; "
                "pass hidden_dim="
            )
        pred = self.projector(student)  # (B, N, D_t)
        loss = self.loss_fn(pred, teacher).float()
        total = weight * loss
        if return_breakdown:
            return SelfAlignmentOutput(total, loss.detach(), weight, mean_cosine_similarity(pred.detach(), teacher))
        return total

    def _run_teacher(self, args: Any, kwargs: Dict[str, Any]) -> torch.Tensor:
        if not args and not kwargs:
            raise ConfigError(
                "sra(...) needs the teacher's inputs, e.g. sra(x_lo, t_lo, y): the EMA model runs on them"
            )
        teacher = self.ema_model
        self._teacher_out = None
        self._teacher_running = True
        try:
            with torch.no_grad():
                teacher(*args, **kwargs)
        finally:
            self._teacher_running = False
        self.teacher_calls += 1
        out, self._teacher_out = self._teacher_out, None
        if out is None:
            raise CaptureError(
                f"teacher layer {self.teacher_layer!r} did not run during the EMA model's forward "
                "(hooks removed? a different model passed as ema_model?)"
            )
        return _tokens_of(out, f"teacher layer {self.teacher_layer!r}").detach().float()

    @classmethod
    def from_pretrained(
        cls, directory: Any, model: nn.Module, ema_model: nn.Module, **overrides: Any
    ) -> SelfAlignmentRegularizer:
        """Rebuild a regularizer saved by :meth:`save_pretrained` (projector and step restored)."""
        config, state = cls._read_saved(directory)
        if config.get("objective") != "sra":
            raise ConfigError(f"{str(directory)!r} holds a {config.get('objective', 'REPA')!r} objective, not SRA")
        settings = settings_from_dict(SelfAlignmentConfig, config, repr(str(directory)))
        kwargs = settings_kwargs(settings, exclude=("student_layer", "teacher_layer", "objective"))
        kwargs.update(overrides)
        for key in ("weight", "loss", "projector"):
            if kwargs.get(key) is None:
                raise ConfigError(f"the saved regularizer used a custom {key}; pass {key}=... to from_pretrained")
        reg = cls(model, ema_model, settings.student_layer, settings.teacher_layer, **kwargs)
        reg.load_state_dict(state)
        return reg

    def extra_repr(self) -> str:
        return (
            f"student={self.student_layer!r}, teacher={self.teacher_layer!r}, max_gap={self.max_gap}, "
            f"step={self._step}"
        )
