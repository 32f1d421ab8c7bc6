"""The per-step cost harness shared by ``overhead.py`` and ``gpu_benchmark.py``.

One SiT, one batch of data and four ways to train on it, timed interleaved
(vanilla, online, cached, stopped, vanilla, online, ...) so that drift of the machine
(clocks, other processes, thermal state) lands on every arm alike:

- ``vanilla``: the SiT recipe's step without REPA.
- ``online``: REPA with the frozen encoder run on the clean images every step (the paper's setup).
- ``cached``: REPA from the encoder's tokens computed once beforehand, ``reg(features=...)``
  (what a feature cache gives; exact because REPA uses no augmentation).
- ``stopped``: REPA after a ``stop_at`` schedule has fired: weight 0, so the encoder and the
  projectors are skipped (HASTE's hard stop).

One training step is the library's own (:func:`repa.sit.step.training_step`, what ``repa train``
runs): forward on x_t, velocity MSE (+ REPA term), backward, gradient clipping at norm 1.0,
AdamW step, ``zero_grad``, EMA update of the model (and, with REPA, the projectors). Beside the measured times sits the expectation from counted multiply-accumulates
(``torch.utils.flop_counter.FlopCounterMode``; FLOPs = 2 MACs): the SiT step (forward +
backward), the encoder forward and the projector forward + backward. The expected ratio of an
arm to vanilla is (step + encoder + projector) / step online, (step + projector) / step cached
and 1 stopped; measured / expected shows how close the implementation comes to that floor
(element-wise work, the optimizer and the loss are not counted, so a small excess is normal).

``repa`` and ``timm`` are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

ARMS = ("vanilla", "online", "cached", "stopped")
ARM_LABELS = {
    "vanilla": "vanilla",
    "online": "REPA, online encoder",
    "cached": "REPA, cached features",
    "stopped": "REPA, stopped (weight 0)",
}
STOP_STEP = 1_000_000  # where the stopped arm's schedule has fired
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Tiny stand-ins with the geometry of the real pair (SiT patch 2 on res/8 latents and a
#: patch-14 encoder at 224/256 of the image size give the same res/16 grid), for tests.
TINY_SIT = "tiny-sit"
TINY_ENCODER = "tiny-vit"
_TINY_SIT_CONFIG = dict(depth=2, hidden_size=64, num_heads=2, patch_size=2)

#: Dense bf16 peak of a GPU in FLOP/s (vendor datasheets, without sparsity), matched against
#: ``torch.cuda.get_device_name()`` in order: the first key contained in the name wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # same compute as the H100 SXM
    ("A100", 312e12),
)


# ------------------------------------------------------------------------------------ config


@dataclasses.dataclass
class BenchConfig:
    """Everything that defines one measurement; the JSON output records it verbatim."""

    model: str = "SiT-B/2"
    encoder: str = "dinov2-vit-b"
    batch_size: int = 2
    resolution: int = 256
    dtype: str = "fp32"
    compile: bool = False
    compile_backend: str = "inductor"
    device: str = "cpu"
    warmup: int = 1
    repeats: int = 5
    projector_dim: int = 2048
    encoder_depth: Optional[int] = None
    flop_batch: int = 1
    peak_tflops: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SystemExit(f"--dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.resolution % 8:
            raise SystemExit(f"--resolution {self.resolution} must be a multiple of 8 (latents are resolution/8)")
        for name in ("batch_size", "repeats", "projector_dim", "flop_batch"):
            if getattr(self, name) < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise SystemExit(f"--warmup must be >= 0, got {self.warmup}")


def add_arguments(parser: argparse.ArgumentParser, defaults: BenchConfig) -> None:
    """The options of one measurement, with ``defaults`` as their defaults."""
    d = defaults
    parser.add_argument("--model", default=d.model, help=f"SiT name (SiT-S/2 ... SiT-XL/2) or {TINY_SIT!r}")
    parser.add_argument("--encoder", default=d.encoder, help=f"encoder registry name or {TINY_ENCODER!r}")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--resolution", type=int, default=d.resolution, help="image px; latents are res/8 x res/8 x 4")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype, help="autocast dtype (fp32: none)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile, help="torch.compile model and encoder")
    parser.add_argument("--compile-backend", default=d.compile_backend, help="torch.compile backend")
    parser.add_argument("--device", default=d.device, help="cpu or cuda")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed rounds (one step of every arm each)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds")
    parser.add_argument("--projector-dim", type=int, default=d.projector_dim, help="hidden width of the MLP projector")
    parser.add_argument(
        "--encoder-depth", type=int, default=d.encoder_depth,
        help="align the output of this block, 1-based as in the paper; None: 4 for depth <= 12, else 8",
    )
    parser.add_argument("--flop-batch", type=int, default=d.flop_batch, help="batch used to count FLOPs (scaled up)")
    parser.add_argument("--peak-tflops", type=float, default=d.peak_tflops, help="peak TFLOP/s for MFU (default: the detected GPU's dense bf16 peak)")
    parser.add_argument("--seed", type=int, default=d.seed)


def config_from_args(args: Any) -> BenchConfig:
    """A :class:`BenchConfig` from parsed arguments carrying the options of :func:`add_arguments`."""
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    return BenchConfig(**{k: v for k, v in vars(args).items() if k in fields})


def command_line(script: str, cfg: BenchConfig, extra: Sequence[str] = ()) -> str:
    """The full command reproducing ``cfg`` (every option spelled out)."""
    parts = ["python", script]
    for f in dataclasses.fields(BenchConfig):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join([*parts, *extra])


def invoked_command() -> str:
    """The command line as it was typed (interpreter name simplified to ``python``)."""
    return shlex.join(["python", *sys.argv])


# ------------------------------------------------------------------------------------ building


def build_sit(name: str, latent_size: int) -> nn.Module:
    """A randomly initialized SiT on (4, latent, latent) latents with ImageNet's 1000 classes."""
    from repa.sit import create_sit

    if name == TINY_SIT:
        return create_sit("SiT-S/2", input_size=latent_size, **_TINY_SIT_CONFIG)
    return create_sit(name, input_size=latent_size)


def _register_tiny_encoder() -> None:
    from repa.encoders import EncoderSpec, register_encoder
    from repa.encoders.builtin import timm_factory

    spec = EncoderSpec(
        name=TINY_ENCODER,
        embed_dim=32,
        patch_size=14,
        prefix_tokens=1,
        final_norm=True,
        input_scale=224 / 256,  # DINOv2's rule: 224 * R / 256 px -> R/16 tokens per side
        normalize_first=True,
        extract="vit",
        arch="VisionTransformer",
        arch_kwargs=dict(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
        license="none (random weights, benchmarks only)",
    )
    register_encoder(spec, overwrite=True)(timm_factory)


def build_encoder(name: str, cfg: BenchConfig, device: torch.device) -> nn.Module:
    """The frozen encoder through the registry, randomly initialized (speed does not depend on weights).

    It computes in the autocast dtype (``create_encoder(dtype=...)``) and, with ``--compile``,
    compiles its token extraction (``create_encoder(compile=True)``).
    """
    from repa.encoders import create_encoder

    if name == TINY_ENCODER:
        _register_tiny_encoder()
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "fp32" else None
    return create_encoder(
        name, pretrained=False, resolution=cfg.resolution, dtype=dtype, device=device, compile=cfg.compile
    )


def default_layer(model: nn.Module, encoder_depth: Optional[int]) -> int:
    """0-based block index of REPA's 1-based "encoder depth" (depth 8 = ``blocks.7``).

    The paper aligns block 4 of SiT-B/2 and block 8 of SiT-L/2 and SiT-XL/2.
    """
    n = len(model.blocks)
    depth = encoder_depth if encoder_depth is not None else (4 if n <= 12 else 8)
    depth = min(depth, n)
    if depth < 1:
        raise SystemExit(f"--encoder-depth must be >= 1, got {encoder_depth}")
    return depth - 1


# ------------------------------------------------------------------------------------ the bench


class _Bench:
    """The shared model, encoder, regularizer, optimizer and fixed batch of every arm."""

    def __init__(self, cfg: BenchConfig) -> None:
        from repa import REPARegularizer, schedules
        from repa.encoders import FrozenEncoder
        from repa.sit import get_path
        from repa.sit.ema import EMA

        self.cfg = cfg
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        latent = cfg.resolution // 8
        self.model = build_sit(cfg.model, latent).to(self.device).train()
        self.encoder = build_encoder(cfg.encoder, cfg, self.device)
        self.layer = default_layer(self.model, cfg.encoder_depth)
        # One regularizer serves the three REPA arms: its schedule stops at STOP_STEP; the
        # stopped arm passes step=STOP_STEP (weight 0: encoder and projectors skipped), the
        # others step=0. One regularizer means one capture flag, so a compiled model has two
        # variants (capturing or not) instead of one per arm.
        self.reg = REPARegularizer(
            self.model, layers=self.layer, encoders=self.encoder,
            weight=schedules.StopAt(0.5, STOP_STEP), projector_dim=cfg.projector_dim,
        ).to(self.device)
        params = [*self.model.parameters(), *self.reg.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
        self.path = get_path("linear")
        # as repa train: an fp16 GradScaler, EMA (0.9999) of the model and, with REPA, of the projectors
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.dtype == "fp16")
        self.ema_sources: Dict[str, nn.Module] = {"model": self.model, "projectors": self.reg.projectors}
        self.ema = EMA(self.ema_sources, 0.9999)
        self.ema_sources_vanilla: Dict[str, nn.Module] = {"model": self.model}
        self.ema_vanilla = EMA(self.ema_sources_vanilla, 0.9999)

        b, r = cfg.batch_size, cfg.resolution
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.latents = torch.randn(b, 4, latent, latent, generator=g).to(self.device)  # (B, 4, r/8, r/8)
        self.images = torch.randint(0, 256, (b, 3, r, r), generator=g, dtype=torch.uint8).to(self.device)  # (B, 3, r, r)
        self.labels = torch.randint(0, 1000, (b,), generator=g).to(self.device)  # (B,)
        with torch.no_grad():
            self.features = self.encoder(self.images)  # (B, N, D_e) float32, the "cache"
        # the model is compiled after the hooks are attached (hooks added later would be ignored)
        self.forward_model: Callable[..., torch.Tensor] = (
            torch.compile(self.model, backend=cfg.compile_backend) if cfg.compile else self.model
        )
        # FLOPs are counted eagerly: an uncompiled view sharing the encoder's network
        self.encoder_count_view = FrozenEncoder(
            self.encoder.model, self.encoder.spec, resolution=self.encoder.resolution
        ).to(self.device)

    def autocast(self) -> Any:
        if self.cfg.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.cfg.dtype])

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return None if self.cfg.dtype == "fp32" else DTYPES[self.cfg.dtype]

    def _captures_for(self, arm: str) -> Any:
        return self.reg.disabled() if arm == "vanilla" else contextlib.nullcontext()

    def _inputs(self, arm: str, n: Optional[int] = None) -> Any:
        """The step's inputs for ``arm`` on the first ``n`` samples: fresh times and noise each call."""
        from repa.sit import sample_time
        from repa.sit.step import StepBatch

        n = n or self.cfg.batch_size
        x = self.latents[:n]  # (n, 4, h, w)
        t = sample_time(n, device=self.device)  # (n,)
        eps = torch.randn_like(x)  # (n, 4, h, w)
        cached = arm == "cached"
        return StepBatch(x=x, y=self.labels[:n], t=t, noise=eps, images=None if cached else self.images[:n],
                         features=self.features[:n] if cached else None)

    def _step_kwargs(self, arm: str) -> Dict[str, Any]:
        """What differs between the arms: REPA or not, and the schedule's step (the stopped arm: weight 0)."""
        if arm == "vanilla":
            return {"regularizer": None}
        return {"regularizer": self.reg, "reg_step": STOP_STEP if arm == "stopped" else 0}

    def loss(self, arm: str, n: Optional[int] = None, model: Optional[Callable[..., torch.Tensor]] = None) -> torch.Tensor:
        """The training loss of ``arm`` on the first ``n`` samples of the batch (all by default)."""
        from repa.sit.step import step_losses

        with self._captures_for(arm):
            return step_losses(
                model or self.forward_model, self._inputs(arm, n), path=self.path, amp_dtype=self.amp_dtype,
                **self._step_kwargs(arm),
            ).loss

    def step(self, arm: str) -> None:
        """One full training step of ``arm``: the library's step (``repa.sit.step.training_step``), as ``repa train``
        runs it: loss, backward, gradient clipping at 1.0, AdamW, EMA of the model (and the projectors)."""
        from repa.sit.step import training_step

        ema, sources = (self.ema_vanilla, self.ema_sources_vanilla) if arm == "vanilla" else (self.ema, self.ema_sources)
        with self._captures_for(arm):
            training_step(
                self.forward_model, self._inputs(arm), path=self.path, optimizer=self.optimizer,
                scaler=self.scaler, amp_dtype=self.amp_dtype, max_grad_norm=1.0, ema=ema, ema_sources=sources,
                **self._step_kwargs(arm),
            )

    # -------------------------------------------------------------- FLOP counting
    def count_flops(self) -> Dict[str, float]:
        """Counted FLOPs per image of the step, the encoder forward and the projectors (eager)."""
        from torch.utils.flop_counter import FlopCounterMode

        n = min(self.cfg.flop_batch, self.cfg.batch_size)

        def counted(fn: Callable[[], Any]) -> float:
            with FlopCounterMode(display=False, custom_mapping=attention_flop_formulas()) as counter:
                fn()
            return float(counter.get_total_flops())

        def train_step() -> None:
            self.loss("vanilla", n, model=self.model).backward()

        step = counted(train_step)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            encoder = counted(lambda: self.encoder_count_view(self.images[:n]))
        n_tokens = math.prod(self.model.grid)
        projector = 0.0
        for (layer, _), proj in zip(self.reg.pairs, self.reg.projectors):
            width = self.reg.model_dims[layer]
            hidden = torch.randn(n, n_tokens, width, device=self.device, requires_grad=True)  # (n, N, D)

            def proj_step(proj: nn.Module = proj, hidden: torch.Tensor = hidden) -> None:
                with self.autocast():
                    out = proj(hidden, self.model.grid) if getattr(proj, "uses_grid", False) else proj(hidden)
                out.float().sum().backward()  # (n, N, D_e) -> scalar

            projector += counted(proj_step)
        self.reg.zero_grad(set_to_none=True)
        return {"step": step / n, "encoder": encoder / n, "projector": projector / n}


def attention_flop_formulas() -> Dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU attention kernels, which ``FlopCounterMode`` leaves uncounted.

    ``F.scaled_dot_product_attention`` on CPU dispatches to
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward), which the counter
    has no formula for; the CUDA kernels (flash, efficient, cuDNN) are counted natively. The
    formulas are the counter's own SDPA ones: forward 4 * B * H * N_q * N_k * d (QK^T and AV),
    backward twice that.
    """
    from torch.utils import flop_counter as fc

    registered = set(fc.flop_registry)
    mapping: Dict[Any, Callable[..., int]] = {}
    fwd_name = "_scaled_dot_product_flash_attention_for_cpu"
    if hasattr(torch.ops.aten, fwd_name) and getattr(torch.ops.aten, fwd_name) not in registered:

        def forward(query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
            return fc.sdpa_flop_count(query, key, value)

        mapping[getattr(torch.ops.aten, fwd_name)] = forward
    bwd_name = fwd_name + "_backward"
    if hasattr(torch.ops.aten, bwd_name) and getattr(torch.ops.aten, bwd_name) not in registered:

        def backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)

        mapping[getattr(torch.ops.aten, bwd_name)] = backward
    return mapping


class _Memory:
    """Peak memory of one step: CUDA allocator peak, or on CPU the growth of the resident set.

    On CPU, Linux's high-water mark (VmHWM) is reset before the step through
    ``/proc/self/clear_refs`` and its rise over the resident size before the step is recorded.
    The allocator keeps freed memory for reuse, so this is a lower bound of the step's
    working memory (memory reused from an earlier step does not count).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.available = self.cuda or self._can_reset()
        self.base = 0

    @property
    def kind(self) -> str:
        if self.cuda:
            return "CUDA: torch.cuda.max_memory_allocated during the step (all live tensors, model and optimizer state included)"
        if self.available:
            return "CPU: rise of the resident set's high-water mark over its size before the step (a lower bound: reused heap memory does not count)"
        return "CPU: unavailable (cannot reset the resident high-water mark on this system)"

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return _status_kib("VmHWM") is not None
        except OSError:
            return False

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.base = _status_kib("VmRSS") or 0

    def stop(self) -> Optional[float]:
        """MiB for the step since :meth:`start`, or None when not measurable."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if not self.available:
            return None
        peak = _status_kib("VmHWM") or 0
        return max(peak - self.base, 0) / 1024


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops_for_name(name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a GPU named ``name`` (as CUDA reports it), or None when unknown."""
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def gpu_peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak FLOP/s of ``device`` (None on CPU or for a GPU not in :data:`PEAK_BF16_FLOPS`)."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def run_benchmark(cfg: BenchConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Measure every arm of ``cfg`` interleaved; returns the JSON-ready result."""
    from tqdm import tqdm

    started = time.perf_counter()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False; use --device cpu")
    bench = _Bench(cfg)
    flops = bench.count_flops()
    memory = _Memory(device)

    times: Dict[str, List[float]] = {arm: [] for arm in ARMS}
    peaks: Dict[str, List[float]] = {arm: [] for arm in ARMS}
    rounds = cfg.warmup + cfg.repeats
    bar = tqdm(total=rounds * len(ARMS), desc=f"{cfg.model} b{cfg.batch_size}", disable=not progress, file=sys.stderr)
    for r in range(rounds):
        for arm in ARMS:  # interleaved: drift of the machine lands on every arm alike
            _sync(device)
            memory.start()
            t0 = time.perf_counter()
            bench.step(arm)
            _sync(device)
            elapsed = time.perf_counter() - t0
            peak = memory.stop()
            if r >= cfg.warmup:
                times[arm].append(elapsed)
                if peak is not None:
                    peaks[arm].append(peak)
            bar.update(1)
    bar.close()

    peak_flops = cfg.peak_tflops * 1e12 if cfg.peak_tflops else gpu_peak_flops(device)
    per_image = flops
    arm_flops = {
        "vanilla": per_image["step"],
        "online": per_image["step"] + per_image["encoder"] + per_image["projector"],
        "cached": per_image["step"] + per_image["projector"],
        "stopped": per_image["step"],
    }
    result_arms: Dict[str, Dict[str, Any]] = {}
    vanilla_median = statistics.median(times["vanilla"])
    for arm in ARMS:
        ts = times[arm]
        median = statistics.median(ts)
        q1, q3 = (statistics.quantiles(ts, n=4, method="inclusive")[i] for i in (0, 2)) if len(ts) > 1 else (median, median)
        ratio = median / vanilla_median
        expected = arm_flops[arm] / arm_flops["vanilla"]
        step_flops = arm_flops[arm] * cfg.batch_size
        result_arms[arm] = {
            "label": ARM_LABELS[arm],
            "times_s": ts,
            "median_s": median,
            "iqr_s": q3 - q1,
            "images_per_s": cfg.batch_size / median,
            "peak_mem_mib": max(peaks[arm]) if peaks[arm] else None,
            "ratio_to_vanilla": ratio,
            "expected_ratio": expected,
            "measured_over_expected": ratio / expected,
            "flops_per_step": step_flops,
            "achieved_tflops": step_flops / median / 1e12,
            "mfu": step_flops / median / peak_flops if peak_flops else None,
        }
    return {
        "config": dataclasses.asdict(cfg),
        "environment": environment(device),
        "layer": f"blocks.{bench.layer}",
        "memory_measure": memory.kind,
        "peak_flops": peak_flops,
        "flops_per_image": per_image,
        "flops_note": "FLOPs = 2 x multiply-accumulates counted by torch.utils.flop_counter.FlopCounterMode "
        f"at batch {min(cfg.flop_batch, cfg.batch_size)}, per image; step = SiT forward + backward, encoder = "
        "forward, projector = forward + backward",
        "arms": result_arms,
        "wall_s": time.perf_counter() - started,
    }


def environment(device: torch.device) -> Dict[str, Any]:
    """Versions and machine facts recorded beside every result."""
    import repa

    env: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "repa": repa.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# ------------------------------------------------------------------------------------ output


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def format_table(result: Dict[str, Any]) -> str:
    """The arms of one result as a markdown table."""
    arms = result["arms"]
    show_mfu = any(a["mfu"] is not None for a in arms.values())
    head = "| arm | median step (s) | IQR (s) | images/s | peak mem (MiB) | ratio to vanilla | expected (FLOPs) | measured / expected |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if show_mfu:
        head += " MFU |"
        rule += "---:|"
    lines = [head, rule]
    for arm in ARMS:
        a = arms[arm]
        row = (
            f"| {a['label']} | {_fmt(a['median_s'], '.4f')} | {_fmt(a['iqr_s'], '.4f')} | "
            f"{_fmt(a['images_per_s'], '.2f')} | {_fmt(a['peak_mem_mib'], '.0f')} | {_fmt(a['ratio_to_vanilla'], '.3f')} | "
            f"{_fmt(a['expected_ratio'], '.3f')} | {_fmt(a['measured_over_expected'], '.3f')} |"
        )
        if show_mfu:
            row += f" {_fmt(a['mfu'] * 100 if a['mfu'] is not None else None, '.1f')}% |"
        lines.append(row)
    return "\n".join(lines)


def format_flops(result: Dict[str, Any]) -> str:
    """One line with the counted GFLOPs per image (and GMACs = GFLOPs / 2)."""
    f = result["flops_per_image"]
    parts = [f"{k} {f[k] / 1e9:.2f} GFLOPs ({f[k] / 2e9:.2f} GMACs)" for k in ("step", "encoder", "projector")]
    return "Counted per image: " + ", ".join(parts)


def write_json(data: Dict[str, Any], path: str) -> None:
    """Write ``data`` as JSON atomically (a temp file in the same folder, then a rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
