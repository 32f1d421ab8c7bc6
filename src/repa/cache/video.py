"""Video feature caches: per-latent-frame encoder targets of clips stored as folders of frames.

    repa cache --video --data CLIPS --encoders dinov2-vit-b --temporal-compression 4 --out CACHE
    repa cache verify CACHE
    ds = CachedVideoFeatureDataset(CACHE)
    ds[0] == {"clip": "clip_000", "features": {"dinov2-vit-b": fp16 (T_lat, N, 768)}}
    reg(features=default_collate([ds[i] for i in batch])["features"])      # (B, T_lat, N, D)

``CLIPS`` holds one subfolder per clip with its frames as image files, read in natural name
order (``frame_2.png`` before ``frame_10.png``). No video-file decoder is required (none is
assumed installed): extract frames first, e.g. ``ffmpeg -i clip.mp4 CLIPS/clip/%05d.png``.
Every frame is encoded with the registry encoder exactly as ``reg(videos)`` encodes it (floats
in [0, 1] through the encoder's own preprocessing), then the frames are grouped like the video
VAE groups them (:func:`repa.video.latent_frame_groups`: first frame alone, then runs of
``temporal_compression``) and averaged (or one frame picked): the cache stores what the
regularizer aligns, (T_lat, N, D) per clip and encoder.

Layout of a video cache folder::

    index.json                 written last (atomically): format, settings, fingerprint, one record per clip
    clip-00000.safetensors     "features.<k>" (T_lat, N_k, D_k) in the storage dtype, k-th encoder of the index
    clip-00000.json            the clip's record (source folder, frames, bytes, sha256, fingerprint)
    .lock                      present while a build runs (a second build of the same folder stops)

Re-running the same command continues an unfinished build (finished clips are kept); other
settings on an existing folder stop with :class:`~repa.errors.CacheMismatchError`. Reads check
each clip file's sha256 against the index once per process and refuse non-finite values.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .._io import atomic_write, atomic_write_text
from ..errors import (
    CacheMismatchError,
    ConfigError,
    CorruptCacheError,
    DataNotFoundError,
    ShapeMismatchError,
)
from ..video import FRAME_POOLING, latent_frame_groups

_log = logging.getLogger("repa")

__all__ = [
    "VIDEO_CACHE_FORMAT",
    "FRAME_EXTENSIONS",
    "list_clips",
    "read_clip",
    "build_video_cache",
    "verify_video_cache",
    "is_video_cache",
    "CachedVideoFeatureDataset",
    "add_video_arguments",
    "handles",
    "main",
]

logger = logging.getLogger("repa")

VIDEO_CACHE_FORMAT = "repa-video-feature-cache/1"
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
_INDEX = "index.json"
_LOCK = ".lock"
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- reading clips
def _natural_key(name: str) -> List[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_clips(root: PathLike) -> List[Tuple[str, List[Path]]]:
    """``[(clip name, [frame paths in natural order]), ...]`` for the clip subfolders of ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(f"video folder {str(root)!r} does not exist; pass --data with one subfolder of frames per clip")
    clips = []
    for sub in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name)):
        frames = sorted(
            (f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in FRAME_EXTENSIONS),
            key=lambda f: _natural_key(f.name),
        )
        if frames:
            clips.append((sub.name, frames))
    if not clips:
        raise DataNotFoundError(
            f"no clips in {str(root)!r}: expected one subfolder per clip holding its frames as images "
            f"({', '.join(FRAME_EXTENSIONS)}); extract frames from video files first (e.g. ffmpeg -i a.mp4 DIR/a/%05d.png)"
        )
    return clips


def read_clip(frames: Sequence[Path], size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Frames as uint8 (T, 3, H, W), resized (bicubic) to ``size`` = (H, W) when given."""
    from PIL import Image

    out = []
    for path in frames:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            out.append(np.asarray(im, dtype=np.uint8))
    shapes = {a.shape for a in out}
    if len(shapes) != 1:
        raise ShapeMismatchError(
            f"frames of clip {str(frames[0].parent)!r} have different sizes {sorted(shapes)}; pass --frame-size H,W"
        )
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)


# --------------------------------------------------------------------------- small file helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 2**20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _clip_file(i: int) -> str:
    return f"clip-{i:05d}.safetensors"


def _clip_record(i: int) -> str:
    return f"clip-{i:05d}.json"


class _BuildLock:
    """An exclusive ``.lock`` file: two builds never write one folder at once."""

    def __init__(self, out: Path) -> None:
        self.path = out / _LOCK
        self.fd: Optional[int] = None

    def __enter__(self) -> _BuildLock:
        try:
            self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise CacheMismatchError(
                f"another build is writing {str(self.path.parent)!r} (lock file {str(self.path)!r}); wait for it, or "
                "delete the lock file if no build is running"
            ) from None
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
        if self.path.exists():
            self.path.unlink()


# --------------------------------------------------------------------------- building
def _video_clips(
    data: PathLike, encoders: Union[str, Sequence[str]], temporal_compression: int, frame_pooling: str,
    num_frames: Optional[int], dtype: str, frame_chunk: int,
) -> Tuple[List[str], List[Tuple[str, List[Path]]]]:
    """Check :func:`build_video_cache`'s settings; the encoder names and the clips (name, frame files) to encode."""
    names = [n.strip() for n in encoders.split(",")] if isinstance(encoders, str) else list(encoders)
    names = [n for n in names if n]
    if not names:
        raise ConfigError("--encoders is empty; pass registry names, e.g. --encoders dinov2-vit-b")
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if frame_pooling not in FRAME_POOLING:
        raise ConfigError(f"frame pooling must be one of {list(FRAME_POOLING)}, got {frame_pooling!r}")
    if int(frame_chunk) < 1:
        raise ConfigError(f"frame chunk must be a positive int, got {frame_chunk!r}")
    clips = list_clips(data)
    if num_frames is not None:
        short = [name for name, frames in clips if len(frames) < num_frames]
        if short:
            raise ShapeMismatchError(f"clips {short[:5]} have fewer than --num-frames {num_frames} frames")
        clips = [(name, frames[:num_frames]) for name, frames in clips]
    for name, frames in clips:  # every clip must fit the VAE's grouping before anything is encoded
        try:
            latent_frame_groups(len(frames), temporal_compression)
        except ShapeMismatchError as exc:
            raise ShapeMismatchError(f"clip {name!r}: {exc}; or pass --num-frames") from None

    return names, clips


def _existing_video_cache(out: Path, fingerprint: str) -> Optional[Dict[str, Any]]:
    """The finished index of ``out`` when it matches ``fingerprint``; None to (continue to) build; else refuse."""
    index_path = out / _INDEX
    if index_path.exists():
        old = json.loads(index_path.read_text())
        if old.get("fingerprint") != fingerprint:
            raise CacheMismatchError(
                f"{str(out)!r} already holds a video cache made with other settings or data (fingerprint "
                f"{old.get('fingerprint')} != {fingerprint}); choose another --out or delete that folder"
            )
        return old
    records_here = sorted(out.glob("clip-*.json"))
    if any(out.iterdir()) and not records_here and not (out / _LOCK).exists():
        raise CacheMismatchError(f"{str(out)!r} is not empty and holds no video cache; choose an empty --out folder")
    for path in records_here:  # an unfinished build continues only with its own settings
        try:
            other = json.loads(path.read_text()).get("fingerprint")
        except (OSError, ValueError):
            other = None
        if other != fingerprint:
            raise CacheMismatchError(
                f"{str(out)!r} holds an unfinished video cache made with other settings or data ({path.name}: "
                f"fingerprint {other} != {fingerprint}); re-run the original command, choose another --out, or delete it"
            )

    return None


def _encode_clip(
    out: Path, i: int, clip: str, frames: List[Path], names: List[str], models: List[Any], fingerprint: str,
    dev: torch.device, *, frame_size: Optional[Tuple[int, int]], temporal_compression: int, frame_pooling: str,
    frame_chunk: int, dtype: str,
) -> Dict[str, Any]:
    """Encode clip ``i`` with every encoder, write its targets file; returns its record."""
    video = read_clip(frames, frame_size)  # (T, 3, H, W) uint8
    tensors = {}
    shapes = {}
    for k, (name, enc) in enumerate(zip(names, models)):
        y = _clip_targets(enc, video, temporal_compression, frame_pooling, frame_chunk, dev)  # (T_lat, N, D)
        if not bool(torch.isfinite(y).all()):
            raise CorruptCacheError(f"encoder {name!r} gave non-finite targets for clip {clip!r}")
        tensors[f"features.{k}"] = y.to(_DTYPES[dtype]).cpu().contiguous()
        grid = enc.grid(tuple(video.shape[-2:]))
        shapes[name] = {"shape": list(y.shape), "grid": [y.shape[0], *grid]}
    size, digest = _write_clip(out / _clip_file(i), tensors, {"clip": clip, "fingerprint": fingerprint})
    rec = {
        "index": i, "clip": clip, "file": _clip_file(i), "frames": len(frames), "bytes": size,
        "sha256": digest, "fingerprint": fingerprint, "targets": shapes,
    }
    return rec


def build_video_cache(
    data: PathLike,
    out: PathLike,
    encoders: Union[str, Sequence[str]],
    *,
    temporal_compression: int = 4,
    frame_pooling: str = "mean",
    num_frames: Optional[int] = None,
    frame_size: Optional[Tuple[int, int]] = None,
    dtype: str = "fp16",
    frame_chunk: int = 64,
    weights: Optional[Dict[str, str]] = None,
    pretrained: bool = True,
    seed: int = 0,
    device: Optional[str] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Encode every clip of ``data`` and store its per-latent-frame targets in ``out``; returns the index.

    Args:
        data: a folder with one subfolder of frames per clip.
        out: the cache folder (created; an unfinished build with the same settings continues).
        encoders: registry names (a comma-separated string or a list).
        temporal_compression: the video VAE's frames per latent frame after the first (Wan,
            CogVideoX, HunyuanVideo: 4; LTX-Video: 8). Clips must have 1 + k * n frames.
        frame_pooling: ``"mean"`` of a group's frames, or ``"first"``/``"middle"``/``"last"``.
        num_frames: keep the first ``num_frames`` frames of each clip (clips shorter: an error).
        frame_size: resize frames to (H, W); default: the frames' own size (all clips equal).
        dtype: storage dtype, ``"fp16"`` (default), ``"bf16"`` or ``"fp32"``.
        frame_chunk: frames per encoder call.
        weights: encoder name -> local weights file; pretrained/seed: random encoders for tests.
    """
    from ..encoders import create_encoder

    names, clips = _video_clips(data, encoders, temporal_compression, frame_pooling, num_frames, dtype, frame_chunk)
    weights = dict(weights or {})
    settings = {
        "format": VIDEO_CACHE_FORMAT,
        "encoders": names,
        "temporal_compression": int(temporal_compression),
        "frame_pooling": frame_pooling,
        "num_frames": num_frames,
        "frame_size": list(frame_size) if frame_size else None,
        "dtype": dtype,
        "pretrained": bool(pretrained),
        "seed": int(seed) if not pretrained else None,
        "weights": {k: _sha256(Path(v)) for k, v in sorted(weights.items())},
        "clips": [[name, [f.name for f in frames]] for name, frames in clips],
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / _INDEX
    old = _existing_video_cache(out, fingerprint)
    if old is not None:
        return old
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with _BuildLock(out):
        built = []
        models = []
        for i, name in enumerate(names):
            torch.manual_seed(seed + i)
            models.append(create_encoder(name, pretrained=pretrained, weights=weights.get(name), device=dev))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(clips), desc="repa cache (video)", unit="clip")
        records = []
        for i, (clip, frames) in enumerate(clips):
            record_path = out / _clip_record(i)
            if record_path.exists():
                rec = json.loads(record_path.read_text())
                path = out / _clip_file(i)
                if rec.get("fingerprint") == fingerprint and path.is_file() and path.stat().st_size == rec.get("bytes"):
                    records.append(rec)
                    if bar:
                        bar.update(1)
                    continue
            rec = _encode_clip(out, i, clip, frames, names, models, fingerprint, dev, frame_size=frame_size,
                               temporal_compression=temporal_compression, frame_pooling=frame_pooling,
                               frame_chunk=frame_chunk, dtype=dtype)
            _atomic_write_text(record_path, json.dumps(rec, sort_keys=True))
            records.append(rec)
            built.append(clip)
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        index = {**settings, "fingerprint": fingerprint, "count": len(records), "records": records}
        index.pop("clips")
        _atomic_write_text(index_path, json.dumps(index, indent=1, sort_keys=True))
    logger.info("repa cache (video): %d clips in %s (%d encoded now)", len(records), out, len(built))
    return index


@torch.no_grad()
def _clip_targets(
    encoder: Any, video: torch.Tensor, k: int, pooling: str, chunk: int, device: torch.device
) -> torch.Tensor:
    """uint8 frames (T, 3, H, W) -> per-latent-frame targets (T_lat, N, D) in fp32."""
    groups = latent_frame_groups(video.shape[0], k)
    picks = [g if pooling == "mean" else [g[{"first": 0, "middle": (len(g) - 1) // 2, "last": -1}[pooling]]] for g in groups]
    needed = sorted({f for p in picks for f in p})
    tokens: Dict[int, torch.Tensor] = {}
    for start in range(0, len(needed), chunk):
        idx = needed[start : start + chunk]
        x = video[idx].to(device).float() / 255.0  # (n, 3, H, W) in [0, 1], as reg(videos) passes them
        y = encoder(x)  # (n, N, D) or (n, D, h, w)
        if y.ndim == 4:
            y = y.flatten(2).transpose(1, 2)
        for j, f in enumerate(idx):
            tokens[f] = y[j].float()
    return torch.stack([torch.stack([tokens[f] for f in p]).mean(0) for p in picks])  # (T_lat, N, D)


def _write_clip(path: Path, tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> Tuple[int, str]:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"repa": json.dumps({"format": VIDEO_CACHE_FORMAT, **meta})}))
    return path.stat().st_size, _sha256(path)


# --------------------------------------------------------------------------- reading
def is_video_cache(path: Optional[PathLike]) -> bool:
    """True when ``path`` holds a video cache's index."""
    if not path:
        return False
    index = Path(path) / _INDEX
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == VIDEO_CACHE_FORMAT
    except (OSError, ValueError):
        return False


def _load_index(root: Path) -> Dict[str, Any]:
    if not is_video_cache(root):
        raise DataNotFoundError(f"{str(root)!r} holds no finished video cache (no {_INDEX} of format {VIDEO_CACHE_FORMAT})")
    return json.loads((root / _INDEX).read_text())


def verify_video_cache(root: PathLike) -> List[str]:
    """Every problem found (missing file, size or sha256 mismatch, non-finite values); empty when sound."""
    from safetensors.torch import load_file

    root = Path(root)
    index = _load_index(root)
    problems = []
    for rec in index["records"]:
        path = root / rec["file"]
        if not path.is_file():
            problems.append(f"{rec['file']} (clip {rec['clip']!r}) is missing")
            continue
        if path.stat().st_size != rec["bytes"] or _sha256(path) != rec["sha256"]:
            problems.append(f"{rec['file']} (clip {rec['clip']!r}) does not match its sha256 in the index")
            continue
        if not all(bool(torch.isfinite(t.float()).all()) for t in load_file(str(path)).values()):
            problems.append(f"{rec['file']} (clip {rec['clip']!r}) holds non-finite values")
    return problems


class CachedVideoFeatureDataset(Dataset):
    """Per-latent-frame targets of a video cache: ``{"clip": name, "features": {encoder: (T_lat, N, D)}}``.

    Each clip file's sha256 is checked against the index the first time this process reads it.
    """

    def __init__(self, root: PathLike, encoders: Optional[Sequence[str]] = None, *, checksum: bool = True) -> None:
        self.root = Path(root)
        self.index = _load_index(self.root)
        known = list(self.index["encoders"])
        self.encoders = list(encoders) if encoders is not None else known
        missing = [e for e in self.encoders if e not in known]
        if missing:
            raise CacheMismatchError(f"the video cache {str(self.root)!r} holds encoders {known}, not {missing}")
        self.checksum = checksum
        self._verified: set = set()

    def __len__(self) -> int:
        return len(self.index["records"])

    def __getitem__(self, i: int) -> Dict[str, Any]:
        from safetensors.torch import load_file

        rec = self.index["records"][i]
        path = self.root / rec["file"]
        if not path.is_file():
            raise CorruptCacheError(f"{str(path)!r} (clip {rec['clip']!r}) is missing; rebuild by re-running repa cache")
        if self.checksum and i not in self._verified:
            if _sha256(path) != rec["sha256"]:
                raise CorruptCacheError(
                    f"{str(path)!r} (clip {rec['clip']!r}) does not match its sha256 in the index; rebuild it: delete "
                    f"the file and {rec['file'][:-12]}.json, then re-run the same repa cache command"
                )
            self._verified.add(i)
        tensors = load_file(str(path))
        known = list(self.index["encoders"])
        out = {}
        for name in self.encoders:
            y = tensors[f"features.{known.index(name)}"]
            if not bool(torch.isfinite(y.float()).all()):
                raise CorruptCacheError(f"{str(path)!r} (clip {rec['clip']!r}) holds non-finite targets of {name!r}")
            out[name] = y  # (T_lat, N, D)
        return {"clip": rec["clip"], "features": out}


# --------------------------------------------------------------------------- command line (through repa cache)
def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``repa cache --video`` options (added to ``repa cache``'s parser)."""
    g = parser.add_argument_group("video folders (--video)")
    g.add_argument("--video", action="store_true", help="--data holds one subfolder of frames per clip")
    g.add_argument("--temporal-compression", type=int, default=4,
                   help="video VAE frames per latent frame after the first: 4 Wan/CogVideoX/HunyuanVideo, 8 LTX (default 4)")
    g.add_argument("--frame-pooling", default="mean", choices=list(FRAME_POOLING),
                   help="targets of a latent frame: mean of its frames (default) or one frame")
    g.add_argument("--num-frames", type=int, default=None, help="keep the first N frames of each clip (1 + k * n)")
    g.add_argument("--frame-size", default=None, metavar="H,W", help="resize frames to H x W (default: as stored)")
    g.add_argument("--frame-chunk", type=int, default=64, help="frames per encoder call (default 64)")


def handles(args: argparse.Namespace) -> bool:
    """Whether ``repa cache`` was asked for a video build or to verify a video cache."""
    if getattr(args, "video", False):
        return True
    return getattr(args, "action", None) == "verify" and is_video_cache(getattr(args, "directory", None))


def _parse_size(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ConfigError(f"--frame-size must be H,W (e.g. 480,832), got {text!r}") from None
    return (h, w)


def main(args: argparse.Namespace) -> int:
    """``repa cache --video ...`` or ``repa cache verify VIDEO_CACHE``."""
    if getattr(args, "action", None) == "verify":
        problems = verify_video_cache(args.directory)
        for p in problems:
            print(f"repa cache verify: BAD: {p}", file=sys.stderr)
        if problems:
            return 1
        print(f"repa cache verify: OK: video cache of {_load_index(Path(args.directory))['count']} clips in {args.directory}")
        return 0
    missing = [flag for flag, value in (("--data", args.data), ("--encoders", args.encoders), ("--out", args.out)) if not value]
    if missing:
        raise ConfigError(f"repa cache --video needs {', '.join(missing)}")
    if args.resolution is not None:
        raise ConfigError("--resolution is the square crop of image folders; for videos pass --frame-size H,W")
    weights = {}
    for item in args.weights or []:
        if "=" not in item:
            raise ConfigError(f"--weights takes NAME=PATH, got {item!r}")
        k, v = item.split("=", 1)
        weights[k] = v
    index = build_video_cache(
        args.data, args.out, args.encoders, temporal_compression=args.temporal_compression,
        frame_pooling=args.frame_pooling, num_frames=args.num_frames, frame_size=_parse_size(args.frame_size),
        dtype=args.dtype, frame_chunk=args.frame_chunk, weights=weights, pretrained=args.pretrained, seed=args.seed,
        device=args.device, progress=not args.no_progress,
    )
    _log.info(f"cache: video cache of {index['count']} clips at {args.out}; check with `repa cache verify {args.out}`")
    return 0
