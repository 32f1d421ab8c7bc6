"""The documentation cannot rot: its Python examples run, and its relative links resolve.

Every fenced ```python block of README.md and docs/*.md runs here, offline on CPU, as written.
Names a block uses without defining them (``model``, ``images``, ...) come from a small stand-in
namespace per block (tiny random models, random tensors), built in this file and keyed by a line
of the block. A block that cannot run offline (it needs pretrained weights, a dataset, a GPU) is
skipped only when the Markdown says why, with ``<!-- skip-test: REASON -->`` on the line before
its fence; the reason is the skip message (pytest -ra lists them).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_RE = re.compile(r"^<!--\s*skip-test:(.*?)-->\s*$")
FENCE_RE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")


@dataclass
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: Optional[str]  # the stated reason, or None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract_blocks(path: Path) -> List[Block]:
    """Fenced code blocks of ``path`` with their language and the skip reason stated before them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        sm = SKIP_RE.match(prev.strip())
        skip = sm.group(1).strip() if sm else None
        blocks.append(Block(path, i + 1, lang, "\n".join(lines[i + 1 : j]), skip))
        i = j + 1
    return blocks


PY_BLOCKS = [b for p in DOC_FILES for b in extract_blocks(p) if b.lang == "python"]


# --------------------------------------------------------------------------- stand-ins
# Each builder returns the names a block uses but does not define. Keyed by a line the block
# contains; every runnable block must match exactly one key (tested below).


def _tiny_sit(**overrides: Any) -> nn.Module:
    from repa.sit import create_sit

    kw = dict(depth=8, hidden_size=32, num_heads=2, input_size=8, in_channels=4, num_classes=10)
    kw.update(overrides)
    return create_sit("SiT-S/2", **kw)  # 4x4 tokens on 8x8 inputs


def _tiny_vae() -> nn.Module:
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    ).eval()  # 32x32 images -> 4 x 8 x 8 latents


class _ConvEncoder(nn.Module):
    """A frozen-encoder stand-in: (B, C, H, W) in [0, 1] -> (B, (H/4)(W/4), 12) tokens."""

    def __init__(self, in_chans: int = 3, dim: int = 12) -> None:
        super().__init__()
        self.embed_dim = dim
        self.conv = nn.Conv2d(in_chans, dim, 4, stride=4)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.conv(x).flatten(2).transpose(1, 2)  # (B, N, D)


def _without_encoder(tmp: Path) -> Dict[str, Any]:
    model = _tiny_sit()
    b = 4
    x = torch.randn(b, 4, 8, 8)  # latents
    t = torch.rand(b)
    eps = torch.randn_like(x)
    tv = t.view(-1, 1, 1, 1)
    t_lo = (t - 0.1).clamp(0, 1)  # the teacher's lower noise level
    return dict(
        torch=torch, model=model, ema_model=copy.deepcopy(model), vae=_tiny_vae(),
        x_t=(1 - tv) * x + tv * eps, t=t, y=torch.randint(0, 10, (b,)), v=eps - x, mse=F.mse_loss,
        x_lo=(1 - t_lo.view(-1, 1, 1, 1)) * x + t_lo.view(-1, 1, 1, 1) * eps, t_lo=t_lo,
        images=torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8),
    )


class _Logger:
    def __init__(self) -> None:
        self.records: List[Dict[str, float]] = []

    def log(self, record: Dict[str, float]) -> None:
        self.records.append(dict(record))


def _combine(tmp: Path) -> Dict[str, Any]:
    from repa import DispersiveRegularizer, REPARegularizer, combine

    model = _tiny_sit(in_channels=3)
    b = 4
    x = torch.rand(b, 3, 8, 8)
    t = torch.rand(b)
    eps = torch.randn_like(x)
    reg = REPARegularizer(model, layers=1, encoders=_ConvEncoder())  # 2x2 targets, resampled to 4x4
    disp = DispersiveRegularizer(model, layers=2)
    pred = model((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps, t, torch.randint(0, 10, (b,)))
    # `combine` is imported by the page's previous block
    return dict(combine=combine, reg=reg, disp=disp, x=x, pred=pred, v=eps - x, mse=F.mse_loss, logger=_Logger())


def _transport(tmp: Path) -> Dict[str, Any]:
    from repa import REPARegularizer

    model = _tiny_sit(in_channels=3)
    x = torch.rand(4, 3, 8, 8)
    return dict(torch=torch, model=model, x=x, y=torch.randint(0, 10, (4,)),
                reg=REPARegularizer(model, layers=1, encoders=_ConvEncoder()))


def _metrics(tmp: Path) -> Dict[str, Any]:
    n = 8100  # the block trains on the first 8,000
    torch.manual_seed(0)
    images = torch.rand(n, 3, 8, 8)
    encoder = _ConvEncoder()
    hidden = encoder(images) @ torch.randn(12, 16) + 0.5 * torch.randn(n, 4, 16)  # (n, 4, 16)
    return dict(hidden_states=hidden, encoder=encoder, images=images,
                labels=torch.randint(0, 4, (n,)), gen_feats=torch.randn(500, 8), ref_feats=torch.randn(500, 8) + 0.5)


def _probe(tmp: Path) -> Dict[str, Any]:
    model = _tiny_sit(in_channels=3, depth=3)
    return dict(model=model, encoder=_ConvEncoder(),
                images=torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), labels=torch.randint(0, 2, (40,)))


def _own_encoder(tmp: Path) -> Dict[str, Any]:
    from safetensors.torch import save_file

    class MyViT(nn.Module):
        """normalized (B, 3, H, W) -> (B, 1 + N, 256): a CLS token and 16x16 patch tokens."""

        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 256, 16, stride=16)
            self.cls = nn.Parameter(torch.zeros(1, 1, 256))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tok = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, 256)
            return torch.cat([self.cls.expand(len(x), -1, -1), tok], 1)

    save_file(MyViT().state_dict(), str(tmp / "my_encoder.safetensors"))
    return dict(MyViT=MyViT, model=_tiny_sit(), REPARegularizer=__import__("repa").REPARegularizer)


def _forget_my_encoder() -> None:
    from repa.encoders import registry

    registry._REGISTRY.pop("my-encoder", None)


STANDINS: Dict[str, Tuple[Callable[[Path], Dict[str, Any]], Optional[Callable[[], None]]]] = {
    "disp = DispersiveRegularizer(model, layers=2)": (_without_encoder, None),
    "out = combine(repa=reg(x, return_breakdown=True)": (_combine, None),
    'path = get_path("linear")': (_transport, None),
    "h = hidden_states.mean(1)": (_metrics, None),
    "res = probe_alignment(model, encoder, images, labels": (_probe, None),
    '@register_encoder("my-encoder"': (_own_encoder, _forget_my_encoder),
}


def _standin_for(block: Block):
    keys = [k for k in STANDINS if k in block.code]
    return keys


# --------------------------------------------------------------------------- tests


def test_the_docs_have_python_examples_and_every_skip_states_a_reason():
    assert len(PY_BLOCKS) >= 8, [b.id for b in PY_BLOCKS]
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("<!--") and "skip-test" in line:
                m = SKIP_RE.match(line.strip())
                assert m and m.group(1).strip(), f"{path.name}:{i + 1}: a skip-test marker needs a reason"
                nxt = next((row for row in lines[i + 1 :] if row.strip()), "")
                assert nxt.startswith("```python"), f"{path.name}:{i + 1}: skip-test must precede a ```python block"


def test_every_runnable_block_has_exactly_one_standin_and_every_standin_is_used():
    used = set()
    for b in PY_BLOCKS:
        keys = _standin_for(b)
        assert len(keys) <= 1, f"{b.id} matches several stand-ins: {keys}"
        used.update(keys)
    assert used == set(STANDINS), f"stand-ins no block uses any more: {set(STANDINS) - used}"


@pytest.mark.parametrize("block", PY_BLOCKS, ids=lambda b: b.id)
def test_python_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.skip is not None:
        pytest.skip(f"{block.id}: {block.skip}")
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    torch.manual_seed(0)
    keys = _standin_for(block)
    namespace: Dict[str, Any] = {"__name__": "__docs__"}
    cleanup = None
    if keys:
        build, cleanup = STANDINS[keys[0]]
        namespace.update(build(tmp_path))
    try:
        exec(compile(block.code, block.id, "exec"), namespace)  # the block exactly as written
    finally:
        if cleanup is not None:
            cleanup()
    _check_results(block, namespace, tmp_path)


def _check_results(block: Block, ns: Dict[str, Any], tmp: Path) -> None:
    """What each block promises, checked beyond 'it ran'."""
    if "disp = DispersiveRegularizer" in block.code:
        assert torch.isfinite(ns["loss"]) and ns["loss"].ndim == 0
    if "out = combine(" in block.code:
        logged = ns["logger"].records[0]
        assert {"repa/loss", "repa/weight", "dispersive/loss"} <= set(logged)
        assert any(k.startswith("repa/cosine/") for k in logged)
        assert abs(float(ns["out"].total.detach()) - float((ns["loss"] - ns["mse"](ns["pred"], ns["v"])).detach())) < 1e-5
    if 'path = get_path("linear")' in block.code:
        x_t, t, x = ns["x_t"], ns["t"], ns["x"]
        eps = ns["v_target"] + x  # linear path: v = eps - x, x_t = (1 - t) x + t eps
        torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps)
        assert torch.isfinite(ns["loss"])
    if "h = hidden_states.mean(1)" in block.code:
        assert 0.0 <= ns["acc"] <= 1.0
        # two Gaussians with identity-like covariances shifted by 0.5 in 8 dimensions: FD ~ 8 * 0.25
        assert 1.0 < float(ns["fd"]) < 3.5
    if "probe_alignment(" in block.code:
        assert (tmp / "alignment.png").stat().st_size > 0
        assert len(ns["res"].cknna[0]) == 3  # one value per block of the 3-block model
    if "for step in range(2):" in block.code:
        assert torch.isfinite(ns["loss"]) and ns["reg"].state_dict()["step"] == 2  # two calls counted
    if '@register_encoder("my-encoder"' in block.code:
        from safetensors.torch import load_file

        saved = load_file(str(tmp / "my_encoder.safetensors"))
        enc = ns["reg"].encoders[0]
        assert ns["reg"].encoder_names == ["my-encoder"]
        torch.testing.assert_close(enc.model.patch.weight, saved["patch.weight"])  # the file was loaded


# --------------------------------------------------------------------------- links

LINK_RE = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """The anchor GitHub and mkdocs give a heading: lower case, punctuation dropped, spaces to '-'."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(path: Path) -> set:
    out, fence = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE_RE.match(line):
            fence = not fence
        elif not fence and line.startswith("#"):
            out.add(_slug(line.lstrip("#")))
    return out


def test_slug_matches_the_hand_computed_anchors():
    assert _slug(" Caching encoder targets (`repa cache`)") == "caching-encoder-targets-repa-cache"
    assert _slug("Determinism, resuming, several processes") == "determinism-resuming-several-processes"


def test_every_relative_link_points_to_an_existing_file_and_anchor():
    bad = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code are not links
        for target in LINK_RE.findall(text):
            if re.match(r"^[a-z]+:", target):  # http(s):, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                if dest == (ROOT / "docs" / "architecture.md").resolve():
                    continue  # written with the package-layout change; mkdocs build --strict checks it
                bad.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)
