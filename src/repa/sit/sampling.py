"""Samplers for velocity models: Euler / Heun ODE, Euler-Maruyama SDE, CFG with a guidance interval.

All samplers integrate from pure noise at t = 1 to data at t = 0 (REPA_FACTS section 3) with
a velocity model ``model_fn(x (B, ...), t (B,), y (B,)) -> v (B, ...)``, e.g. a
:class:`repa.sit.models.SiT`.

ODE (probability flow, SiT paper eq. for the velocity field): dx/dt = v(x, t), on the uniform
grid t_i = 1 - i / steps, i = 0 .. steps.

- ``solver="euler"``: x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i); ``steps`` evaluations.
- ``solver="heun"``: Euler predictor, then the trapezoid corrector
  x_{i+1} = x_i + h/2 (v(x_i, t_i) + v(x~_{i+1}, t_{i+1})), on every step but the last, which
  stays Euler so the field is never evaluated at t = 0 (where the exact field of data on a
  low-dimensional set is singular; EDM and REPA's reference do the same). Still second order;
  2 * steps - 1 evaluations.

SDE: for any g(t) >= 0 the forward-time SDE dx = [v + g^2/2 * score] dt + g dW has the same
marginals p_t as the ODE (the extra drift and the diffusion cancel in the Fokker-Planck
equation). Running it backwards in time (dt < 0) gives the update implemented here,

    x_{i+1} = x_i + [v(x_i, t_i) - (1/2) w(t_i) score(x_i, t_i)] (t_{i+1} - t_i) + sqrt(w(t_i) |t_{i+1} - t_i|) z_i,

with w(t) = g(t)^2 = 2 t (REPA's reference "diffusion" coefficient, for both paths) and the
score obtained from the velocity (:meth:`repa.sit.transport.Path.velocity_to_score`).
The grid is ``steps`` points linspace(1, t_end = 0.04, steps) followed by 0: steps - 1
stochastic steps, then one last deterministic step from t_end to 0 with the same drift and no
noise (the score blows up as t -> 0). ``steps`` evaluations in all.

Classifier-free guidance: with ``cfg_scale > 1``, a step starting at t_i with
``guidance_low <= t_i <= guidance_high`` uses v = v_u + cfg_scale * (v_c - v_u), from one call on the doubled batch ``[x, x]`` with
labels ``[y, null]``; other steps use the conditional v_c alone. The score (and so the SDE
drift) is affine in v with the same x_t, so guiding v is the same as guiding the drift.
As in REPA's reference samplers, a scale <= 1 means no guidance at all (a scale in (0, 1)
is NOT applied as a weaker guidance; sample with labels=None for the unconditional model).
The defaults are REPA's best setting minus the guidance scale: ``sample(..., cfg_scale=1.8)``
is the FID 1.42 setting (SDE, 250 steps, cfg 1.8, guidance interval [0, 0.7]).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ..errors import ConfigError, ShapeMismatchError
from .transport import Path, get_path

__all__ = [
    "ModelFn",
    "PAPER_FID_SETTING",
    "METHODS",
    "SOLVERS",
    "sample",
    "guided_velocity",
    "ode_time_grid",
    "sde_time_grid",
    "diffusion_coefficient",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

#: REPA's FID 1.42 setting for SiT-XL/2 on ImageNet 256 (REPA_FACTS section 3).
PAPER_FID_SETTING = dict(method="sde", steps=250, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7)

METHODS = ("ode", "sde")
SOLVERS = {"ode": ("euler", "heun"), "sde": ("euler",)}


def ode_time_grid(steps: int) -> torch.Tensor:
    """Uniform grid from 1 to 0 with ``steps`` intervals, (steps + 1,) float64."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def sde_time_grid(steps: int, t_end: float = 0.04) -> torch.Tensor:
    """``steps`` points linspace(1, t_end) then a final 0, (steps + 1,) float64 (REPA's reference grid)."""
    grid = torch.linspace(1.0, t_end, steps, dtype=torch.float64)  # (steps,)
    return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])  # (steps + 1,)


def diffusion_coefficient(t: float) -> float:
    """w(t) = g(t)^2 = 2 t, the SDE diffusion coefficient of REPA's reference sampler."""
    return 2.0 * t


def guided_velocity(
    model_fn: ModelFn,
    x: torch.Tensor,
    t: float,
    labels: Optional[torch.Tensor],
    *,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_label: Optional[int] = None,
) -> torch.Tensor:
    """The (possibly guided) velocity at time ``t`` for the batch x (B, ...), returned as x's dtype.

    With ``cfg_scale > 1`` and ``guidance_low <= t <= guidance_high`` the model runs once on
    ``[x, x]`` with labels ``[labels, null_label]`` and the result is v_u + cfg_scale (v_c - v_u);
    otherwise (any scale <= 1, as in REPA's reference) it is the plain conditional velocity
    model_fn(x, t, labels).
    """
    b = x.shape[0]
    guide = cfg_scale > 1.0 and guidance_low <= t <= guidance_high  # the reference: only above 1
    if not guide:
        t_in = torch.full((b,), t, dtype=x.dtype, device=x.device)  # (B,)
        return model_fn(x, t_in, labels).to(x.dtype)  # (B, ...)
    if labels is None or null_label is None:
        raise ConfigError(
            f"classifier-free guidance (cfg_scale={cfg_scale}) needs class labels and a null label; "
            "pass labels= and null_label= (the model's num_classes), or cfg_scale=1.0"
        )
    x2 = torch.cat([x, x])  # (2B, ...)
    t2 = torch.full((2 * b,), t, dtype=x.dtype, device=x.device)  # (2B,)
    y2 = torch.cat([labels, torch.full_like(labels, null_label)])  # (2B,)
    v_cond, v_uncond = model_fn(x2, t2, y2).to(x.dtype).chunk(2)  # 2 x (B, ...)
    return v_uncond + cfg_scale * (v_cond - v_uncond)  # (B, ...)


def _validate(
    noise: torch.Tensor,
    labels: Optional[torch.Tensor],
    method: str,
    solver: str,
    steps: int,
    guidance_low: float,
    guidance_high: float,
    sde_t_end: float,
) -> None:
    if method not in SOLVERS:
        raise ConfigError(f"unknown sampling method {method!r}; valid methods are {', '.join(METHODS)}")
    if solver not in SOLVERS[method]:
        raise ConfigError(
            f"solver {solver!r} is not available for method={method!r}; valid solvers are "
            f"{', '.join(SOLVERS[method])}"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive int, got {steps!r}")
    if guidance_low > guidance_high:
        raise ConfigError(
            f"guidance interval [{guidance_low}, {guidance_high}] is empty; need guidance_low <= guidance_high"
        )
    if method == "sde" and not 0.0 < sde_t_end < 1.0:
        raise ConfigError(f"sde_t_end must lie in (0, 1), got {sde_t_end} (REPA uses 0.04)")
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != noise.shape[0]):
        raise ShapeMismatchError(
            f"labels must have shape ({noise.shape[0]},) to match the noise batch, got {tuple(labels.shape)}"
        )


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    method: str = "sde",
    solver: str = "euler",
    steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 0.7,
    null_label: Optional[int] = None,
    path: Union[str, Path] = "linear",
    sde_t_end: float = 0.04,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw samples x_0 (B, ...) from noise x_1 = ``noise`` (B, ...) with a velocity model.

    Args:
        model_fn: ``(x, t, y) -> v``; called with x and t in ``noise.dtype``. A module (or its
            bound method) must be in eval mode.
        noise: standard Gaussian noise, the state at t = 1.
        labels: (B,) class labels (None for an unconditional model without guidance).
        method: ``"ode"`` or ``"sde"`` (Euler-Maruyama; see the module docstring for the exact update).
        solver: ``"euler"`` or ``"heun"`` (ODE only).
        steps: number of grid intervals (model evaluations, doubled inside the guidance interval).
        cfg_scale: guidance scale; guidance (and the doubled batch) only when > 1, as in the
            reference: any scale <= 1 samples the plain conditional model.
        guidance_low, guidance_high: guidance only for steps starting at t in this interval.
        null_label: the unconditional label; defaults to ``num_classes`` of the model (or of the
            object a bound method belongs to) when it has one.
        path: ``"linear"`` or ``"cosine"``, the path the model was trained on (used for the score).
        sde_t_end: the last time of the stochastic part (0.04 in REPA).
        generator: random generator for the SDE noise (on noise's device).
        progress: show a tqdm progress bar.

    The state is integrated in at least float32 (float64 if the noise is float64).
    """
    _validate(noise, labels, method, solver, steps, guidance_low, guidance_high, sde_t_end)
    owner = getattr(model_fn, "__self__", model_fn)  # a SiT, or a bound method of one
    if isinstance(owner, torch.nn.Module) and owner.training:
        raise ConfigError(
            f"{type(owner).__name__} is in training mode, so label dropout would replace some labels by "
            "the null class while sampling; call model.eval() before sampling"
        )
    if null_label is None:
        null_label = getattr(owner, "num_classes", None)
    p = get_path(path)
    in_dtype = noise.dtype
    state_dtype = torch.promote_types(noise.dtype, torch.float32)

    def velocity(x: torch.Tensor, t: float, guide_at: float) -> torch.Tensor:
        """v at time t, guided if the step's start time ``guide_at`` is inside the interval."""
        scale = cfg_scale if guidance_low <= guide_at <= guidance_high else 1.0
        v = guided_velocity(model_fn, x.to(in_dtype), t, labels, cfg_scale=scale, null_label=null_label)
        return v.to(state_dtype)  # (B, ...)

    from tqdm.auto import tqdm

    x = noise.to(state_dtype)  # (B, ...)
    if method == "ode":
        grid = ode_time_grid(steps).tolist()
        for i in tqdm(range(steps), desc="ode", disable=not progress):
            t_cur, t_next = grid[i], grid[i + 1]
            h = t_next - t_cur  # < 0
            v_cur = velocity(x, t_cur, t_cur)  # (B, ...)
            x_euler = x + h * v_cur  # (B, ...)
            if solver == "heun" and i < steps - 1:
                v_next = velocity(x_euler, t_next, t_cur)  # (B, ...)
                x = x + h * 0.5 * (v_cur + v_next)  # (B, ...)
            else:
                x = x_euler
        return x.to(in_dtype)

    grid = sde_time_grid(steps, sde_t_end).tolist()
    for i in tqdm(range(steps), desc="sde", disable=not progress):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur  # < 0
        v = velocity(x, t_cur, t_cur)  # (B, ...)
        t_vec = torch.full((x.shape[0],), t_cur, dtype=state_dtype, device=x.device)  # (B,)
        score = p.velocity_to_score(v, x, t_vec)  # (B, ...)
        w = diffusion_coefficient(t_cur)
        drift = v - 0.5 * w * score  # (B, ...)
        x = x + drift * dt  # (B, ...)
        if i < steps - 1:  # the last step, t_end -> 0, is deterministic
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=state_dtype)  # (B, ...)
            x = x + (w * abs(dt)) ** 0.5 * z  # (B, ...)
    return x.to(in_dtype)
