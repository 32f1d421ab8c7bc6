"""One training step of the SiT recipe, shared by ``repa train`` and the benchmarks.

    x_t, v = path.interpolate(x, noise, t)
    pred = model(x_t, t, y, force_drop_ids=drop)                  # hooks capture the aligned blocks
    loss = mse(pred, v) + reg(images | features) + objectives      # REPA and the encoder-free terms
    backward; unscale; clip grad norm; (check); optimizer step; zero grad; EMA update

The caller draws the step's randomness (times, noise, label dropout) and hands it in as a
:class:`StepBatch`, so the same function serves a distributed run (each rank its rows of a
global draw) and a single-process benchmark. :func:`training_step` is what ``repa train``,
``benchmarks/convergence.py``, ``benchmarks/convergence_sweep.py`` and
``benchmarks/overhead.py`` run, so the benchmarks measure the step users train with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

from .ema import EMA
from .transport import velocity_loss

__all__ = ["StepBatch", "StepLosses", "StepRecord", "step_losses", "objective_terms", "training_step"]


@dataclass
class StepBatch:
    """The inputs of one step: the clean model input and the step's draws (this process's rows)."""

    x: torch.Tensor  # (b, C, h, w) clean model input (pixels in [-1, 1] or scaled latents)
    y: torch.Tensor  # (b,) class labels
    t: torch.Tensor  # (b,) times in [0, 1]
    noise: torch.Tensor  # (b, C, h, w)
    drop: Optional[torch.Tensor] = None  # (b,) 1 = null class (classifier-free guidance); None: the model's own
    images: Optional[torch.Tensor] = None  # (b, 3, H, W) uint8, the encoder's input (online REPA)
    features: Optional[Any] = None  # precomputed encoder targets (a feature cache): no encoder run
    moments: Optional[torch.Tensor] = None  # (b, 2c, h, w) VAE posterior moments (latent runs; the vae objective)


@dataclass
class StepLosses:
    """The differentiable loss of a step and its parts."""

    loss: torch.Tensor  # () the total that is backpropagated
    denoise: torch.Tensor  # () the velocity MSE
    repa: Optional[Any] = None  # the regularizer's breakdown (``.total``, ``.loss``, ``.cosine``), None without REPA
    terms: Dict[str, Any] = field(default_factory=dict)  # each other objective's breakdown


@dataclass
class StepRecord:
    """What :func:`training_step` returns: the step's losses (detached) and the gradient norm."""

    loss: torch.Tensor  # () total
    denoise: torch.Tensor  # () velocity MSE
    align: torch.Tensor  # () REPA's unweighted alignment loss (0 without REPA)
    cos: torch.Tensor  # () mean cosine similarity of REPA's pairs (0 without REPA)
    grad_norm: torch.Tensor  # () gradient norm before clipping
    terms: Dict[str, torch.Tensor] = field(default_factory=dict)  # each other objective's unweighted loss
    repa_total: Optional[torch.Tensor] = None  # () REPA's weighted term (None without REPA)
    term_totals: Dict[str, torch.Tensor] = field(default_factory=dict)  # each other objective's weighted term

    @property
    def alignment_total(self) -> torch.Tensor:
        """() the sum of every weighted representation term (REPA and the others) added to the loss."""
        total = self.repa_total if self.repa_total is not None else torch.zeros((), device=self.loss.device)
        for value in self.term_totals.values():
            total = total + value
        return total


def objective_terms(
    objectives: Mapping[str, nn.Module],
    batch: StepBatch,
    *,
    path: Any,
    generator: Optional[torch.Generator],
    global_batch: int,
    rows: slice = slice(None),
) -> Dict[str, Any]:
    """One step's breakdown of every encoder-free objective (each with ``.total`` and ``.loss``).

    ``dispersive`` reads the captured block; ``sra`` runs the EMA teacher at t - U(0, gap), the
    uniform draw made for the whole global batch from the step's ``generator`` after every other
    draw of the step (so runs without SRA are unchanged); ``vae`` aligns to the posterior mean.
    """
    terms: Dict[str, Any] = {}
    for name, obj in objectives.items():
        if name == "dispersive":
            terms[name] = obj(return_breakdown=True)
        elif name == "sra":
            t = batch.t
            u = torch.rand(global_batch, generator=generator, device=t.device)[rows]  # (b,)
            t_lo = (t - obj.max_gap * u).clamp(0.0, 1.0)  # (b,) a lower noise level
            x_lo, _ = path.interpolate(batch.x, batch.noise, t_lo)  # (b, C, h, w): same image and noise
            terms[name] = obj(x_lo, t_lo, batch.y, force_drop_ids=batch.drop, return_breakdown=True)
        elif name == "vae":
            channels = batch.x.shape[1]
            if batch.moments is None:
                raise ValueError("the vae objective needs StepBatch.moments (a latent run)")
            terms[name] = obj(features=batch.moments[:, :channels], return_breakdown=True)  # (b, c, h, w) mean
        else:
            terms[name] = obj(return_breakdown=True)
    return terms


def step_losses(
    model: Callable[..., torch.Tensor],
    batch: StepBatch,
    *,
    path: Any,
    regularizer: Optional[Callable[..., Any]] = None,
    objectives: Optional[Mapping[str, nn.Module]] = None,
    generator: Optional[torch.Generator] = None,
    global_batch: Optional[int] = None,
    rows: slice = slice(None),
    amp_dtype: Optional[torch.dtype] = None,
    reg_step: Optional[int] = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = velocity_loss,
) -> StepLosses:
    """The step's loss: velocity MSE + REPA (images or cached features) + the other objectives.

    The forward runs under autocast when ``amp_dtype`` is set. ``reg_step`` sets the REPA weight
    schedule's step (default: the regularizer's own counter). ``loss_fn(pred, target)`` is the
    per-element denoising loss (default: :func:`repa.sit.transport.velocity_loss`), averaged.
    """
    device = batch.x.device
    x_t, v_target = path.interpolate(batch.x, batch.noise, batch.t)  # (b, C, h, w) each
    kwargs = {} if batch.drop is None else {"force_drop_ids": batch.drop}
    reg_kwargs: Dict[str, Any] = {"return_breakdown": True}
    if reg_step is not None:
        reg_kwargs["step"] = reg_step
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        pred = model(x_t, batch.t, batch.y, **kwargs)  # (b, C, h, w); hooks capture the aligned blocks
        denoise = loss_fn(pred, v_target).mean()
        out = None
        if regularizer is not None:
            if batch.features is not None:  # precomputed encoder targets: no encoder run
                out = regularizer(features=batch.features, **reg_kwargs)
            else:
                out = regularizer(batch.images, **reg_kwargs)
            loss = denoise + out.total
        else:
            loss = denoise
        terms: Dict[str, Any] = {}
        if objectives:
            terms = objective_terms(
                objectives, batch, path=path, generator=generator,
                global_batch=global_batch if global_batch is not None else batch.x.shape[0], rows=rows,
            )
            loss = loss + sum(term.total for term in terms.values())
    return StepLosses(loss=loss, denoise=denoise, repa=out, terms=terms)


def _idle_projectors(regularizer: Any, out: Any) -> Optional[nn.Module]:
    """The regularizer's projectors when its weight is 0 at this step (a stop schedule), else None.

    At weight 0 the regularizer skips the encoder and projectors but still returns a zero that
    touches every projector parameter (so DDP sees a gradient for each); those all-zero
    gradients are dropped here, so the optimizer, clipping and EMA skip the projectors and a
    stopped REPA step costs what a vanilla step does. The model's update is unchanged.
    """
    if regularizer is None or out is None or out.weight != 0.0:
        return None
    projectors = getattr(regularizer, "projectors", None)
    return projectors if isinstance(projectors, nn.Module) else None


def training_step(
    model: Callable[..., torch.Tensor],
    batch: StepBatch,
    *,
    path: Any,
    optimizer: torch.optim.Optimizer,
    regularizer: Optional[Callable[..., Any]] = None,
    objectives: Optional[Mapping[str, nn.Module]] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    amp_dtype: Optional[torch.dtype] = None,
    max_grad_norm: float = 1.0,
    ema: Optional[EMA] = None,
    ema_sources: Optional[Mapping[str, nn.Module]] = None,
    ema_decay: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    global_batch: Optional[int] = None,
    rows: slice = slice(None),
    reg_step: Optional[int] = None,
    before_update: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = velocity_loss,
) -> StepRecord:
    """One optimizer step: loss, backward, clip, optimizer step, EMA update; returns a :class:`StepRecord`.

    Args:
        model: the (possibly DDP-wrapped or compiled) SiT.
        batch: the step's inputs and draws.
        path: the interpolant (:func:`repa.sit.transport.get_path`).
        optimizer: its parameters (all groups, in order) are the ones clipped.
        regularizer / objectives: REPA and the encoder-free objectives (``dispersive``, ``sra``, ``vae``).
        scaler: the fp16 GradScaler (None: no scaling).
        max_grad_norm: clip the gradient norm to this (<= 0: no clipping; the norm is still measured).
        ema / ema_sources / ema_decay: update the shadows from these modules (``ema_decay``
            overrides the EMA's own decay for this step, e.g. a warm-up).
        generator / global_batch / rows: the step's generator and this process's rows of the
            global batch (SRA's teacher-time draw).
        before_update: called with (loss, grad norm) after clipping, before the optimizer step;
            raise in it to stop before anything is updated (``repa train``'s non-finite check).
        loss_fn: the per-element denoising loss (default: the velocity MSE).
    """
    losses = step_losses(
        model, batch, path=path, regularizer=regularizer, objectives=objectives, generator=generator,
        global_batch=global_batch, rows=rows, amp_dtype=amp_dtype, reg_step=reg_step, loss_fn=loss_fn,
    )
    loss = losses.loss
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    idle = _idle_projectors(regularizer, losses.repa)
    if idle is not None:  # weight 0 this step: the projectors' zero gradients are dropped, so nothing updates them
        for p in idle.parameters():
            p.grad = None
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if before_update is not None:
        before_update(loss, grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        sources = ema_sources if ema_sources is not None else {"model": model}
        ema.update(sources, ema_decay, skip=[k for k, m in sources.items() if idle is not None and m is idle])
    with torch.no_grad():
        zero = torch.zeros((), device=batch.x.device)
        out = losses.repa
        align = out.loss.detach() if out is not None else zero
        cos = (
            torch.stack([c.float() for c in out.cosine.values()]).mean()
            if out is not None and out.cosine
            else zero
        )
        return StepRecord(
            loss=loss.detach(),
            denoise=losses.denoise.detach(),
            align=align,
            cos=cos,
            grad_norm=grad_norm.detach(),
            terms={k: v.loss.detach() for k, v in losses.terms.items()},
            repa_total=out.total.detach() if out is not None else None,
            term_totals={k: v.total.detach() for k, v in losses.terms.items()},
        )
