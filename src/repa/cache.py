"""Feature caches: REPA's encoder targets (and SD-VAE latent moments) precomputed to disk.

REPA trains without data augmentation, so the frozen encoder's target tokens for an image
never change: computed once, they remove the encoder from every training step (REPA_FACTS
section 5: about 6% of a SiT-XL/2 step with DINOv2-B, 31% of a SiT-B/2 step). A cache also
stores the clean pixels (or the latent moments), so training from it needs neither the
encoder nor the original image folder.

    repa cache --data IMAGES --encoders dinov2-vit-b --resolution 256 --out CACHE [--vae SD_VAE_DIR]
    repa cache verify CACHE
    ds = CachedFeatureDataset(CACHE, encoders=["dinov2-vit-b"], dtype="fp16", resolution=256)
    ds[0] == {"image": uint8 (3, 256, 256), "y": int64 (), "features": {"dinov2-vit-b": fp16 (256, 768)}}

Layout of a cache folder (item ``i`` lives in shard ``i // shard_size``)::

    index.json                the cache's description, written last (atomically) by rank 0
    shard-00000.safetensors   items [0, S): "features.<k>" (n, N_k, D_k) in the storage dtype for the
                              k-th encoder of the index, "image" (n, C, R, R) uint8 (unless
                              --no-images), "moments" (n, 2c, h, w) float32 (with --vae or a latent
                              dataset), "y" (n,) int64; metadata "repa": JSON of format, shard, start, count, fingerprint
    shard-00000.json          the shard's record (range, bytes, sha256, labels, fingerprint); a shard
                              without its record is unfinished and is rebuilt on the next run
    ...

Every file is written to a hidden temporary name in the folder and renamed with ``os.replace``.
Under ``torchrun`` rank ``r`` of ``W`` writes the shards ``i`` with ``i % W == r``; after a
barrier rank 0 gathers the records into ``index.json``. Re-running the same command skips
finished shards, so an interrupted build continues and a deleted shard is rebuilt alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import CacheMismatchError, ConfigError, CorruptCacheError, DataNotFoundError

__all__ = [
    "CACHE_FORMAT",
    "STORAGE_DTYPES",
    "CacheBuildReport",
    "CachedFeatureDataset",
    "build_cache",
    "build_image_dataset",
    "bytes_per_image",
    "is_feature_cache",
    "load_index",
    "storage_dtype_name",
    "verify_cache",
    "add_arguments",
    "main",
]

#: ``index.json["format"]`` and every shard's metadata ``format``.
CACHE_FORMAT = "repa-feature-cache/1"
#: Storage dtypes of the target tokens, by their command-line name.
STORAGE_DTYPES: Dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_ALIASES = {
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}
INDEX_NAME = "index.json"
PathLike = Union[str, "os.PathLike[str]"]
#: What :class:`CachedFeatureDataset` checks before it yields a shard's items (``verify=``).
VERIFY_MODES = ("sha256", "none")
_log = logging.getLogger("repa")


# --------------------------------------------------------------------------------------------
# small helpers: dtypes, names, hashing, atomic files
# --------------------------------------------------------------------------------------------


def storage_dtype_name(dtype: Union[str, torch.dtype]) -> str:
    """The canonical name (``"fp16"``, ``"bf16"``, ``"fp32"``) of a storage dtype given by name or torch dtype."""
    if isinstance(dtype, torch.dtype):
        for name, value in STORAGE_DTYPES.items():
            if value == dtype:
                return name
    elif isinstance(dtype, str) and dtype.strip().lower() in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[dtype.strip().lower()]
    raise ConfigError(f"dtype must be one of {list(STORAGE_DTYPES)} (or the torch dtype), got {dtype!r}")


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _record_name(i: int) -> str:
    return f"shard-{i:05d}.json"


def _sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _atomic_json(path: Path, obj: Dict[str, Any], compact: Sequence[str] = ()) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``.

    Keys in ``compact`` (long lists such as the labels) go on one line at the end.
    """
    text = json.dumps({k: v for k, v in obj.items() if k not in compact}, indent=1)
    tail = "".join(f',\n "{k}": {json.dumps(obj[k], separators=(",", ":"))}' for k in compact if k in obj)
    text = text[: text.rindex("}")].rstrip() + tail + "\n}\n"
    tmp = _tmp_path(path)
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fingerprint(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# storage arithmetic
# --------------------------------------------------------------------------------------------


def bytes_per_image(encoder: str, resolution: int, dtype: Union[str, torch.dtype] = "fp16") -> int:
    """Bytes of one image's cached targets of a registry encoder: tokens x dim x bytes per value.

    DINOv2-B at 256 px (224 px input, 16 x 16 tokens): 256 x 768 x 2 = 393,216 bytes in fp16.
    No network is built: the numbers come from the encoder's spec.
    """
    from .encoders import get_encoder_spec

    spec = get_encoder_spec(encoder)
    itemsize = torch.empty((), dtype=STORAGE_DTYPES[storage_dtype_name(dtype)]).element_size()
    return spec.num_tokens(resolution) * spec.embed_dim * itemsize


# --------------------------------------------------------------------------------------------
# the source dataset
# --------------------------------------------------------------------------------------------


def build_image_dataset(
    path: PathLike, resolution: Optional[int] = None, skip_bad_images: bool = False
) -> Tuple[Dataset, Any]:
    """The dataset of ``--data`` and its :class:`repa.datasets.DataInfo`, exactly as ``repa train`` reads it.

    Delegates to :func:`repa.datasets.open_dataset`: an image folder (class subfolders are the
    labels, ADM center crop to ``resolution``), an IDX folder (Fashion-MNIST, native size), or a
    prepared latent folder (its moments are cached too). Items are dicts with ``"image"`` uint8
    (C, H, W), ``"y"`` and possibly ``"moments"``.
    """
    from .datasets import open_dataset

    return open_dataset(path, resolution=resolution, skip_bad_images=skip_bad_images)


def _data_identity(ds: Dataset) -> str:
    """A short hash of what the dataset holds (file list or labels), so a cache is tied to its data."""
    h = hashlib.sha256()
    items = getattr(ds, "items", None)
    labels = getattr(ds, "labels", None)
    if isinstance(items, list):
        h.update(json.dumps(items).encode())
    elif labels is not None:
        h.update(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes())
    h.update(str(len(ds)).encode())  # type: ignore[arg-type]
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


@dataclass
class CacheBuildReport:
    """What one process did in :func:`build_cache`: the shards it built and skipped (already finished)."""

    out: Path
    count: int
    num_shards: int
    built: List[int] = field(default_factory=list)
    skipped: List[int] = field(default_factory=list)
    repaired: List[int] = field(default_factory=list)  # among ``built``: shards found damaged and rebuilt
    rank: int = 0
    world_size: int = 1
    seconds: float = 0.0


def _parse_encoders(encoders: Union[str, Sequence[str]]) -> List[str]:
    names = [n.strip() for n in encoders.split(",")] if isinstance(encoders, str) else [str(n).strip() for n in encoders]
    names = [n for n in names if n]
    if not names:
        raise ConfigError("--encoders is empty; name at least one registry encoder, e.g. --encoders dinov2-vit-b")
    return names


def _parse_weights(weights: Union[Mapping[str, PathLike], Sequence[str], None]) -> Dict[str, str]:
    """``{"name": path}`` or ``["name=PATH", ...]`` -> lower-case name -> absolute path."""
    if not weights:
        return {}
    if isinstance(weights, Mapping):
        pairs = list(weights.items())
    else:
        pairs = []
        for item in weights:
            if "=" not in str(item):
                raise ConfigError(f"--weights takes NAME=PATH (e.g. dinov2-vit-b=/ckpt/dinov2_vitb14.pth), got {item!r}")
            name, path = str(item).split("=", 1)
            pairs.append((name, path))
    out = {}
    for name, path in pairs:
        full = Path(os.path.expanduser(str(path))).resolve()
        if not full.is_file():
            from .errors import WeightsNotFoundError

            raise WeightsNotFoundError(f"--weights {name}={path}: the file {str(full)!r} does not exist")
        out[str(name).strip().lower()] = str(full)
    return out


def _command_line(settings: Mapping[str, Any]) -> str:
    """The ``repa cache ...`` command that (re)builds this cache; stored in the index and in error messages."""
    q = shlex.quote
    parts = [
        "repa cache",
        f"--data {q(settings['data'])}",
        f"--encoders {q(','.join(settings['encoders']))}",
        f"--resolution {settings['resolution']}",
        f"--out {q(settings['out'])}",
        f"--dtype {settings['dtype']}",
        f"--shard-size {settings['shard_size']}",
    ]
    if settings["compute_dtype"] != "fp32":
        parts.append(f"--compute-dtype {settings['compute_dtype']}")
    if settings.get("vae"):
        parts.append(f"--vae {q(settings['vae'])}")
    for name, path in sorted(settings.get("weights", {}).items()):
        parts.append(f"--weights {q(name + '=' + path)}")
    if not settings["pretrained"]:
        parts.append(f"--no-pretrained --seed {settings['seed']}")
    if not settings["store_images"]:
        parts.append("--no-images")
    return " ".join(parts)


def _weights_record(name: str, weights: Dict[str, str], pretrained: bool, seed: int, position: int) -> Dict[str, Any]:
    path = weights.get(name.lower())
    if path is not None:
        return {"source": "file", "path": path, "sha256": _sha256_file(Path(path))}
    if pretrained:
        from .encoders import get_encoder_spec, locate_weights

        found, _ = locate_weights(get_encoder_spec(name))
        return {"source": "pretrained", "path": str(found) if found is not None else None}
    return {"source": "random", "seed": seed + position}


def _write_shard(out: Path, i: int, tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> Tuple[int, str]:
    """Write shard ``i`` atomically; returns (bytes, sha256)."""
    from safetensors.torch import save_file

    path = out / _shard_name(i)
    tmp = _tmp_path(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        with open(tmp, "rb+") as fh:  # durable before the rename makes it visible
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; give the permissions open() would
        digest, size = _sha256_file(tmp), tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return size, digest


def _shard_state(out: Path, i: int, fingerprint: str, *, checksum: bool = True) -> str:
    """``"finished"``, ``"unfinished"`` (no file, no readable record) or ``"damaged"``.

    A shard is finished when its file and its record exist and agree: build fingerprint, size
    and (``checksum=True``) sha256. A file whose bytes differ from its own record was damaged
    after it was written (bit rot, a bad copy, an edit) and is rebuilt, never kept.
    """
    shard, record = out / _shard_name(i), out / _record_name(i)
    if not shard.is_file() or not record.is_file():
        return "unfinished"
    try:
        rec = json.loads(record.read_text())
    except (OSError, ValueError):
        return "unfinished"
    if not isinstance(rec, dict) or rec.get("fingerprint") != fingerprint:
        return "unfinished"
    if rec.get("bytes") != shard.stat().st_size:
        return "damaged"
    if checksum and rec.get("sha256") != _sha256_file(shard):
        return "damaged"
    return "finished"


def _finished(out: Path, i: int, fingerprint: str, *, checksum: bool = True) -> bool:
    """True when shard ``i`` needs no (re)build; see :func:`_shard_state`."""
    return _shard_state(out, i, fingerprint, checksum=checksum) == "finished"


def _existing_fingerprint(out: Path) -> Optional[Tuple[str, str]]:
    """(fingerprint, command) of the cache already in ``out``, or None for an empty folder.

    Read from ``index.json``; when the index is missing or unreadable (an interrupted build, a
    truncated file) from the per-shard records, which hold the same fingerprint and command, so
    a damaged index neither blocks the rebuild nor lets other settings overwrite the shards.
    """
    try:
        index = json.loads((out / INDEX_NAME).read_text())
        if isinstance(index, dict) and index.get("fingerprint"):
            return str(index["fingerprint"]), str(index.get("command", "?"))
    except (OSError, ValueError):
        pass
    for record in sorted(out.glob("shard-*.json")) if out.is_dir() else []:
        try:
            rec = json.loads(record.read_text())
        except (OSError, ValueError):
            continue  # a damaged record: that shard counts as unfinished and is rebuilt
        if isinstance(rec, dict) and rec.get("fingerprint"):
            return str(rec["fingerprint"]), str(rec.get("command", "?"))
    return None


def build_cache(
    data: PathLike,
    out: PathLike,
    encoders: Union[str, Sequence[str]],
    *,
    resolution: Optional[int] = None,
    dtype: Union[str, torch.dtype] = "fp16",
    compute_dtype: Union[str, torch.dtype] = "fp32",
    vae: Optional[str] = None,
    batch_size: int = 64,
    shard_size: int = 1024,
    weights: Union[Mapping[str, PathLike], Sequence[str], None] = None,
    pretrained: bool = True,
    seed: int = 0,
    store_images: bool = True,
    num_workers: int = 0,
    device: Optional[str] = None,
    progress: bool = True,
    skip_bad_images: bool = False,
) -> CacheBuildReport:
    """Precompute encoder targets for every image of ``data`` into the cache folder ``out``.

    Args:
        data: what ``repa train --data`` accepts: an image folder (class subfolders = labels), an
            IDX folder (Fashion-MNIST) or a prepared latent folder.
        out: the cache folder; created if needed. A folder already holding a cache built with
            other settings is refused (:class:`~repa.errors.CacheMismatchError`).
        encoders: registry names (``"dinov2-vit-b,clip-vit-L"`` or a list).
        resolution: center-crop size of image folders (IDX images keep their native size).
        dtype: storage dtype of the targets (``"fp16"``, ``"bf16"``, ``"fp32"``).
        compute_dtype: dtype the encoders run in (targets are float32 out of the encoder, then
            cast to ``dtype``); fp32 matches what ``repa train`` computes online.
        vae: local diffusers ``AutoencoderKL`` folder: also store SD-VAE posterior moments
            (mean, std) as float32, so latent training draws a fresh latent each step.
        batch_size, shard_size: images per encoder call / per shard file.
        weights: per-encoder local weights files, ``{"name": path}`` or ``["name=path"]``.
        pretrained: load each encoder's published weights from the local caches; ``False``
            builds random encoders seeded by ``seed + position`` (tests, benchmarks).
        store_images: store the clean uint8 pixels (needed for pixel-space training; with
            ``vae`` the moments suffice and ``False`` saves 3 R^2 bytes per image).
        num_workers: DataLoader workers reading the images.
        device: where the encoders run (default: this rank's GPU, else the CPU).
        progress: show a tqdm bar (images/s) on rank 0.
        skip_bad_images: leave out (with a warning) image files that cannot be decoded, instead
            of stopping with :class:`~repa.errors.CorruptImageError`.

    Under ``torchrun`` every rank calls this; rank ``r`` builds the shards ``i % world == r``
    and rank 0 writes ``index.json`` after a barrier. Returns this process's report.
    """
    from ._distributed import barrier, init_distributed, shutdown_distributed

    t0 = time.time()
    names = _parse_encoders(encoders)
    dtype_name = storage_dtype_name(dtype)
    compute_name = storage_dtype_name(compute_dtype)
    for what, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive int, got {value!r}")
    weights_map = _parse_weights(weights)

    from .encoders import get_encoder_spec

    specs = [get_encoder_spec(n) for n in names]
    canonical = [s.name for s in specs]
    if len({c.lower() for c in canonical}) != len(canonical):
        raise ConfigError(f"--encoders names an encoder twice: {names}")
    unknown_weights = sorted(set(weights_map) - {c.lower() for c in canonical})
    if unknown_weights:
        raise ConfigError(f"--weights names {unknown_weights}, which are not among --encoders {canonical}")

    dataset, info = build_image_dataset(data, resolution, skip_bad_images)
    has_moments = info.kind == "latents"
    if vae is not None and has_moments:
        raise ConfigError(
            f"--data {str(data)!r} is a prepared latent dataset that already holds SD-VAE moments; drop --vae"
        )
    if vae is not None:
        vae = str(Path(os.path.expanduser(vae)).resolve()) if os.path.isdir(os.path.expanduser(vae)) else vae
    if not store_images and vae is None and not has_moments:
        raise ConfigError(
            "--no-images drops the pixels, but without --vae (or a latent dataset) the pixels are the training "
            "input; keep the images, or pass --vae to store latent moments instead"
        )
    res = int(info.image_size)
    count = len(dataset)  # type: ignore[arg-type]
    num_shards = math.ceil(count / shard_size)
    out = Path(os.path.expanduser(str(out))).resolve()

    settings: Dict[str, Any] = {
        "data": str(Path(os.path.expanduser(str(data))).resolve()),
        "out": str(out),
        "encoders": canonical,
        "resolution": res,
        "dtype": dtype_name,
        "compute_dtype": compute_name,
        "shard_size": shard_size,
        "vae": vae,
        "weights": {c: weights_map[c.lower()] for c in canonical if c.lower() in weights_map},
        "pretrained": bool(pretrained),
        "seed": int(seed),
        "store_images": bool(store_images),
        "batch_size": batch_size,  # not part of the build's identity: targets are per image
    }
    enc_records = []
    for k, spec in enumerate(specs):
        h, w = spec.grid(res)
        enc_records.append(
            {
                "name": spec.name,
                "key": f"features.{k}",
                "shape": [h * w, spec.embed_dim],
                "grid": [h, w],
                "input_size": list(spec.encoder_input_size(res)),
                "compute_dtype": compute_name,
                "weights": _weights_record(spec.name, weights_map, pretrained, seed, k),
                "spec": spec.to_dict(),
            }
        )
    config = {
        "format": CACHE_FORMAT,
        "count": count,
        "resolution": res,
        "dtype": dtype_name,
        "shard_size": shard_size,
        "encoders": [{k: e[k] for k in ("name", "shape", "compute_dtype", "weights")} for e in enc_records],
        "images": bool(store_images),
        "vae": vae,
        "data": {"kind": info.kind, "identity": _data_identity(dataset)},
    }
    fingerprint = _fingerprint(config)
    command = _command_line(settings)

    dist_info = init_distributed(device)
    report = CacheBuildReport(out=out, count=count, num_shards=num_shards, rank=dist_info.rank, world_size=dist_info.world_size)
    try:
        existing = _existing_fingerprint(out)  # every rank checks, so all stop together on a mismatch
        if existing is not None and existing[0] != fingerprint:
            raise CacheMismatchError(
                f"{str(out)!r} already holds a feature cache built with other settings ({existing[1]}); "
                f"this run asks for: {command}. Choose another --out, or delete the folder to rebuild it"
            )
        if dist_info.is_main:
            out.mkdir(parents=True, exist_ok=True)
        barrier(dist_info)

        mine = list(range(dist_info.rank, num_shards, dist_info.world_size))
        states = {i: _shard_state(out, i, fingerprint) for i in mine}  # hashes every finished shard
        pending = [i for i in mine if states[i] != "finished"]
        report.skipped = [i for i in mine if i not in pending]
        report.repaired = [i for i in mine if states[i] == "damaged"]
        for i in report.repaired:
            _log.warning(
                "repa cache: %s does not match its record %s (size or sha256): it was damaged after it was "
                "written; rebuilding it", out / _shard_name(i), _record_name(i),
            )
        if progress and dist_info.is_main:
            per_image = sum(bytes_per_image(n, res, dtype_name) for n in canonical)
            print(
                f"repa cache: {count} images at {res}px -> {out}: {_human(per_image)} of {dtype_name} targets per image, "
                f"{_human(per_image * count)} in all; {num_shards} shard(s) over {dist_info.world_size} process(es), "
                f"{len(report.skipped)} already finished here",
                file=sys.stderr,
            )
        if pending:
            _build_shards(
                dataset, out, pending, enc_records, specs, settings, info, fingerprint, command,
                count=count, num_workers=num_workers, device=dist_info.device, progress=progress and dist_info.is_main,
                rank=dist_info.rank, world=dist_info.world_size,
            )
        report.built = pending
        barrier(dist_info)

        if dist_info.is_main:
            _write_index(out, num_shards, count, fingerprint, command, enc_records, settings, info, dataset)
        barrier(dist_info)
    finally:
        shutdown_distributed(dist_info)
    report.seconds = time.time() - t0
    return report


def _build_shards(
    dataset: Dataset,
    out: Path,
    pending: List[int],
    enc_records: List[Dict[str, Any]],
    specs: List[Any],
    settings: Dict[str, Any],
    info: Any,
    fingerprint: str,
    command: str,
    *,
    count: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
    rank: int,
    world: int,
) -> None:
    """Encode and write the shards in ``pending`` (this rank's unfinished ones)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .encoders import create_encoder

    S, bs, res = settings["shard_size"], settings["batch_size"], settings["resolution"]
    storage = STORAGE_DTYPES[settings["dtype"]]
    compute = STORAGE_DTYPES[settings["compute_dtype"]]
    encoders = []
    for k, spec in enumerate(specs):
        path = settings["weights"].get(spec.name)
        if path is None and not settings["pretrained"]:
            torch.manual_seed(settings["seed"] + k)  # the same random encoder on every rank and every run
        encoders.append(
            create_encoder(
                spec.name,
                pretrained=settings["pretrained"] if path is None else False,
                weights=path,
                resolution=res,
                dtype=None if compute == torch.float32 else compute,
                device=device,
            )
        )
    vae_model = None
    if settings["vae"] is not None:
        from .datasets import load_vae

        vae_model = load_vae(settings["vae"], device)

    batches: List[List[int]] = []
    owner: List[int] = []
    for i in pending:
        lo, hi = i * S, min(count, (i + 1) * S)
        for b in range(lo, hi, bs):  # batches never straddle shards
            batches.append(list(range(b, min(hi, b + bs))))
            owner.append(i)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    total = sum(min(count, (i + 1) * S) - i * S for i in pending)
    bar = tqdm(total=total, unit="img", unit_scale=True, disable=not progress, dynamic_ncols=True,
               desc=f"cache rank {rank}/{world}" if world > 1 else "cache")
    parts: Dict[str, List[torch.Tensor]] = {}
    current: Optional[int] = None
    try:
        for shard, batch in zip(owner, loader):
            if current is not None and shard != current:
                _flush(out, current, parts, count, S, enc_records, fingerprint, command)
                parts = {}
            current = shard
            images = batch["image"]  # (B, C, H, W) uint8
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise ConfigError(f"the dataset must yield uint8 images (C, H, W); got {images.dtype} {tuple(images.shape)}")
            dev_images = images.to(device)
            for rec, enc in zip(enc_records, encoders):
                tokens = enc(dev_images)  # (B, N, D) float32
                if list(tokens.shape[1:]) != rec["shape"]:
                    raise ConfigError(
                        f"encoder {rec['name']!r} returned tokens {tuple(tokens.shape[1:])} for {res}px images, but its "
                        f"spec promises {tuple(rec['shape'])}; check the encoder's registration"
                    )
                stored = tokens.to(storage)  # (B, N, D)
                _check_finite_targets(stored, tokens, rec["name"], shard)
                parts.setdefault(rec["key"], []).append(stored.cpu())  # (B, N, D)
            if settings["store_images"]:
                parts.setdefault("image", []).append(images.cpu())  # (B, C, H, W)
            if vae_model is not None:
                from .datasets import encode_moments

                parts.setdefault("moments", []).append(encode_moments(vae_model, dev_images).cpu())  # (B, 2c, h, w)
            elif "moments" in batch:
                parts.setdefault("moments", []).append(batch["moments"].float())  # (B, 2c, h, w)
            parts.setdefault("y", []).append(torch.as_tensor(batch["y"]).long().view(-1))  # (B,)
            bar.update(images.shape[0])
        if current is not None:
            _flush(out, current, parts, count, S, enc_records, fingerprint, command)
    finally:
        bar.close()


def _check_finite_targets(stored: torch.Tensor, tokens: torch.Tensor, name: str, shard: int) -> None:
    """Never write NaN/Inf targets: a training run would read them as NaN losses."""
    if bool(torch.isfinite(stored).all()):
        return
    finite_before = bool(torch.isfinite(tokens).all())
    hint = (
        "the values overflow the storage dtype: build with --dtype bf16 or --dtype fp32"
        if finite_before
        else "the encoder itself returned them: check its weights (and --compute-dtype)"
    )
    from .errors import CacheError

    raise CacheError(f"encoder {name!r} gave non-finite targets for images of shard {shard}; nothing was written for it; {hint}")


def _flush(
    out: Path,
    i: int,
    parts: Dict[str, List[torch.Tensor]],
    count: int,
    shard_size: int,
    enc_records: List[Dict[str, Any]],
    fingerprint: str,
    command: str,
) -> None:
    """Concatenate one shard's batches, write the shard, then its record."""
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    start, n = i * shard_size, min(count, (i + 1) * shard_size) - i * shard_size
    if tensors["y"].shape[0] != n:  # pragma: no cover - guards the batch bookkeeping
        raise CorruptCacheError(f"shard {i} collected {tensors['y'].shape[0]} items, expected {n}")
    meta = {"format": CACHE_FORMAT, "shard": i, "start": start, "count": n, "fingerprint": fingerprint}
    # one metadata entry holding sorted JSON: the header (a hash map) then has one order, so a
    # shard rebuilt from the same inputs has the same bytes and the same checksum
    size, digest = _write_shard(out, i, tensors, {"repa": json.dumps(meta, sort_keys=True)})
    record = {
        "file": _shard_name(i),
        "shard": i,
        "start": start,
        "count": n,
        "bytes": size,
        "sha256": digest,
        "fingerprint": fingerprint,
        "command": command,
        "labels": tensors["y"].tolist(),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
    }
    _atomic_json(out / _record_name(i), record, compact=("labels",))


def _write_index(
    out: Path,
    num_shards: int,
    count: int,
    fingerprint: str,
    command: str,
    enc_records: List[Dict[str, Any]],
    settings: Dict[str, Any],
    info: Any,
    dataset: Dataset,
) -> None:
    """Rank 0, after every shard is written: gather the shard records into ``index.json``."""
    from ._version import __version__

    shards, labels = [], []
    for i in range(num_shards):
        path = out / _record_name(i)
        if not _finished(out, i, fingerprint, checksum=False):  # hashed by the rank that wrote or kept it
            raise CorruptCacheError(
                f"shard {str(out / _shard_name(i))!r} was not written (a process failed?); run the same command "
                f"again to build the missing shards: {command}"
            )
        rec = json.loads(path.read_text())
        labels.extend(rec["labels"])
        shards.append({k: rec[k] for k in ("file", "start", "count", "bytes", "sha256", "tensors")})
    first = shards[0]["tensors"] if shards else {}
    classes = getattr(dataset, "classes", None)
    if classes is None and hasattr(dataset, "meta"):
        classes = dataset.meta.get("classes")  # type: ignore[attr-defined]
    moments = None
    if "moments" in first:
        two_c, h, w = first["moments"]["shape"][1:]
        moments = {
            "shape": [two_c, h, w],
            "dtype": "float32",
            "latent_channels": two_c // 2,
            "latent_scale": float(info.latent_scale),
            "vae": settings["vae"] or info.vae,
        }
    index = {
        "format": CACHE_FORMAT,
        "repa_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fingerprint": fingerprint,
        "command": command,
        "count": count,
        "resolution": settings["resolution"],
        "dtype": settings["dtype"],
        "shard_size": settings["shard_size"],
        "num_shards": num_shards,
        "encoders": enc_records,
        "images": {"shape": first["image"]["shape"][1:], "dtype": "uint8"} if "image" in first else None,
        "moments": moments,
        "num_classes": int(info.num_classes),
        "classes": list(classes) if classes is not None else None,
        "source": {"data": settings["data"], "kind": info.kind},
        "labels": labels,
        "shards": [{k: s[k] for k in ("file", "start", "count", "bytes", "sha256")} for s in shards],
    }
    _atomic_json(out / INDEX_NAME, index, compact=("labels",))


# --------------------------------------------------------------------------------------------
# reading and verifying
# --------------------------------------------------------------------------------------------


_INDEX_KEYS = ("fingerprint", "command", "count", "resolution", "dtype", "encoders", "labels", "shards")


def _shard_files(root: Path) -> List[Path]:
    """The shard files and shard records ``repa cache`` writes into a folder."""
    if not root.is_dir():
        return []
    return sorted(root.glob("shard-[0-9][0-9][0-9][0-9][0-9].json")) + sorted(
        root.glob("shard-[0-9][0-9][0-9][0-9][0-9].safetensors")
    )


def is_feature_cache(path: PathLike) -> bool:
    """True if ``path`` is a folder written by ``repa cache``, intact or not.

    An ``index.json`` of this format makes a cache; so do shard files or records beside a
    missing, truncated or unreadable index (an interrupted or damaged cache), so that
    ``repa train --data`` reports it as a damaged cache, with the command that repairs it,
    instead of treating the folder as something else.
    """
    root = Path(os.path.expanduser(str(path)))
    index_file = root / INDEX_NAME
    if index_file.is_file():
        try:
            text = index_file.read_text()
        except (OSError, UnicodeDecodeError):
            return bool(_shard_files(root))
        try:
            index = json.loads(text)
        except ValueError:  # truncated: our format string is near the top, or the shards tell
            return f'"{CACHE_FORMAT}"' in text or bool(_shard_files(root))
        return (isinstance(index, dict) and index.get("format") == CACHE_FORMAT) or bool(_shard_files(root))
    return bool(_shard_files(root))


def _command_from_records(root: Path) -> str:
    """The build command stored in the shard records (what repairs a missing or damaged index)."""
    for record in sorted(root.glob("shard-*.json")) if root.is_dir() else []:
        try:
            command = json.loads(record.read_text()).get("command")
        except (OSError, ValueError, AttributeError):
            continue
        if command:  # the folder may have been moved since: point --out at it
            return re.sub(r"--out ('[^']*'|\S+)", lambda m: f"--out {shlex.quote(str(root))}", str(command), count=1)
    return "the same `repa cache` command that built it"


def load_index(root: PathLike) -> Dict[str, Any]:
    """The parsed ``index.json`` of a cache folder, with clear errors for a missing, unfinished or damaged cache.

    A missing, truncated or incomplete index raises :class:`~repa.errors.CorruptCacheError`
    naming the command that repairs it: re-running the build rewrites the index from the
    per-shard records and keeps every intact shard.
    """
    root = Path(os.path.expanduser(str(root)))
    index_file = root / INDEX_NAME
    if not index_file.is_file():
        if _shard_files(root):
            raise CorruptCacheError(
                f"the feature cache {str(root)!r} has no {INDEX_NAME}: its build did not finish or the index was "
                f"deleted; finish or repair it with: {_command_from_records(root)}"
            )
        raise DataNotFoundError(
            f"{str(root)!r} is not a feature cache (no {INDEX_NAME}); build one with "
            "`repa cache --data DIR --encoders NAME --out DIR`"
        )
    try:
        index = json.loads(index_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCacheError(
            f"{str(index_file)!r} is damaged (not valid JSON: {exc}); repair it by running the cache's build command "
            f"again, which rewrites the index from the shard records and keeps intact shards: {_command_from_records(root)}"
        ) from exc
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise CacheMismatchError(f"{str(index_file)!r} has format {found!r}, expected {CACHE_FORMAT!r}")
    missing = [k for k in _INDEX_KEYS if k not in index]
    if missing:
        raise CorruptCacheError(
            f"{str(index_file)!r} is damaged (no {missing}); repair it by running the cache's build command again: "
            f"{index.get('command') or _command_from_records(root)}"
        )
    return index


def _expected_shapes(index: Mapping[str, Any], n: int) -> Dict[str, List[int]]:
    shapes = {e["key"]: [n, *e["shape"]] for e in index["encoders"]}
    if index.get("images"):
        shapes["image"] = [n, *index["images"]["shape"]]
    if index.get("moments"):
        shapes["moments"] = [n, *index["moments"]["shape"]]
    shapes["y"] = [n]
    return shapes


def _open_shard(root: Path, index: Mapping[str, Any], i: int, *, checksum: bool) -> Any:
    """safe_open shard ``i`` after checking existence, size, (checksum), build fingerprint and shapes."""
    from safetensors import safe_open

    entry = index["shards"][i]
    path = root / entry["file"]
    fix = (
        f"rebuild it: delete {str(path)!r} if it exists and run `{index['command']}` (finished shards are kept); "
        f"`repa cache verify {str(root)}` checks every shard"
    )
    if not path.is_file():
        raise CorruptCacheError(f"cache shard {str(path)!r} is missing; {fix}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CorruptCacheError(f"cache shard {str(path)!r} has {size} bytes, the index says {entry['bytes']}; {fix}")
    if checksum:
        digest = _sha256_file(path)
        if digest != entry["sha256"]:
            raise CorruptCacheError(
                f"cache shard {str(path)!r} has sha256 {digest[:12]}..., the index says {entry['sha256'][:12]}...; {fix}"
            )
    try:
        handle = safe_open(str(path), framework="pt")
        meta = json.loads((handle.metadata() or {}).get("repa", "{}"))
        shapes = {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise CorruptCacheError(f"cache shard {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); {fix}") from exc
    if meta.get("fingerprint") != index["fingerprint"]:
        raise CorruptCacheError(
            f"cache shard {str(path)!r} belongs to another build (fingerprint {meta.get('fingerprint')!r}, the index "
            f"says {index['fingerprint']!r}); {fix}"
        )
    want = _expected_shapes(index, entry["count"])
    for key, shape in want.items():
        if shapes.get(key) != shape:
            raise CorruptCacheError(
                f"cache shard {str(path)!r}: tensor {key!r} has shape {shapes.get(key)}, the index says {shape}; {fix}"
            )
    return handle


def verify_cache(root: PathLike, *, checksums: bool = True) -> List[str]:
    """Check every shard of a cache against its index; returns one message per bad shard (empty: all good).

    Checks existence, byte size, sha256 (``checksums=True``), the build fingerprint in the
    shard's metadata and every tensor's shape. Each message names the file and the rebuild command.
    """
    root = Path(os.path.expanduser(str(root)))
    index = load_index(root)
    problems = []
    total = 0
    for i, entry in enumerate(index["shards"]):
        total += entry["count"]
        try:
            _open_shard(root, index, i, checksum=checksums)
        except CorruptCacheError as exc:
            problems.append(str(exc))
    if total != index["count"] or len(index.get("labels", [])) != index["count"]:
        problems.append(
            f"the index of {str(root)!r} is inconsistent: shards hold {total} items, labels {len(index.get('labels', []))}, "
            f"count says {index['count']}; rebuild the index by running `{index['command']}`"
        )
    return problems


def _verify_mode(verify: Union[str, bool]) -> str:
    """``verify=`` of :class:`CachedFeatureDataset` as one of :data:`VERIFY_MODES` (bools accepted)."""
    if isinstance(verify, bool):
        return "sha256" if verify else "none"
    if isinstance(verify, str) and verify.strip().lower() in VERIFY_MODES:
        return verify.strip().lower()
    raise ConfigError(f"verify must be one of {list(VERIFY_MODES)}, got {verify!r}")


def _check_finite_item(item: Mapping[str, Any], shard: Path, index: int, command: str) -> None:
    """Stop on NaN/Inf targets or moments as they are read: a damaged shard would train to NaN.

    One fused min/max reduction per tensor (NaN propagates through min and max, Inf shows in
    them), several times cheaper than ``isfinite(t).all()`` on CPU; cost in benchmarks/RESULTS.md.
    """
    tensors = [("features of " + repr(name), t) for name, t in item["features"].items()]
    if "moments" in item:
        tensors.append(("latent moments", item["moments"]))
    for what, t in tensors:
        if t.numel() and not all(math.isfinite(v) for v in torch.stack(torch.aminmax(t)).tolist()):
            raise CorruptCacheError(
                f"cache shard {str(shard)!r}: item {index} holds non-finite {what} (NaN or Inf); the shard is damaged: "
                f"`repa cache verify {str(shard.parent)}` names every bad shard, and re-running `{command}` rebuilds them"
            )


class CachedFeatureDataset(Dataset):
    """A feature cache as a map-style dataset: what one training step needs, no encoder, no image folder.

    Args:
        root: the cache folder written by ``repa cache`` / :func:`build_cache`.
        encoders: the encoder names the run aligns to (case-insensitive), in the run's order;
            ``None``: every encoder of the cache. A name the cache lacks raises
            :class:`~repa.errors.CacheMismatchError`.
        dtype: the storage dtype the run expects (``"fp16"``, ``torch.float16``, ...), checked.
        resolution: the image size the run expects, checked.
        verify: ``"sha256"`` (default) hashes each shard and compares it with the index before
            its first item is read, once per shard for this dataset object (its DataLoader
            workers share the result); ``"none"`` skips the hash, for a cache already checked
            with ``repa cache verify`` (``True``/``False`` mean the same). Either way every
            item's targets (and latent moments) are checked finite as they are read, and sizes,
            shapes and the build fingerprint are checked when a shard is opened.
        load_images: yield ``"image"`` (default: when stored). Latent training needs only
            ``"moments"``; pass ``False`` to skip reading pixels.

    Item ``i`` is a dict::

        "image":    uint8 (C, R, R)            the clean image (when stored)
        "moments":  float32 (2c, h, w)         SD-VAE posterior mean and std (when cached with --vae)
        "y":        int64 ()                   the class label
        "features": {name: (N, D) tensor}      targets in the storage dtype, keyed by the names
                                               asked for (default: the cache's encoder names)

    The default collate turns a batch into ``batch["features"][name]`` of shape (B, N, D), ready
    for ``reg(features=batch["features"])`` when the regularizer's encoder names are the same.
    Shards are opened lazily (memory-mapped by safetensors), once per process; the dataset pickles
    without open handles, so DataLoader workers open their own.
    """

    def __init__(
        self,
        root: PathLike,
        encoders: Union[str, Sequence[str], None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        resolution: Optional[int] = None,
        *,
        verify: Union[str, bool] = "sha256",
        load_images: Optional[bool] = None,
    ) -> None:
        self.root = Path(os.path.expanduser(str(root)))
        self.index = index = load_index(self.root)
        command = index["command"]
        stored = [e["name"] for e in index["encoders"]]
        by_lower = {n.lower(): e for n, e in zip(stored, index["encoders"])}
        if encoders is None:
            wanted = list(stored)
        else:
            wanted = [encoders] if isinstance(encoders, str) else list(encoders)
        self._keys: List[Tuple[str, str]] = []  # (name yielded, tensor key in the shard)
        for name in wanted:
            entry = by_lower.get(str(name).strip().lower())
            if entry is None:
                raise CacheMismatchError(
                    f"the feature cache {str(self.root)!r} holds targets of {stored}, not of encoder {name!r}; "
                    f"build a cache for it with `repa cache --data {shlex.quote(index['source']['data'])} --encoders {name} "
                    f"--resolution {index['resolution']} --out NEW_DIR`, or align to {stored}"
                )
            self._keys.append((str(name), entry["key"]))
        self.encoder_names: List[str] = [n for n, _ in self._keys]
        if resolution is not None and int(resolution) != int(index["resolution"]):
            raise CacheMismatchError(
                f"the feature cache {str(self.root)!r} was built at resolution {index['resolution']}, the run asks for "
                f"{resolution}; targets depend on the resolution (the encoder's token grid): build a cache at "
                f"{resolution} (`repa cache ... --resolution {resolution}`) or train at {index['resolution']}"
            )
        if dtype is not None and storage_dtype_name(dtype) != index["dtype"]:
            raise CacheMismatchError(
                f"the feature cache {str(self.root)!r} stores targets in {index['dtype']}, the run asks for "
                f"{storage_dtype_name(dtype)}; build a cache with --dtype {storage_dtype_name(dtype)} or ask for "
                f"dtype={index['dtype']!r}"
            )
        self.resolution: int = int(index["resolution"])
        self.dtype: torch.dtype = STORAGE_DTYPES[index["dtype"]]
        self.count: int = int(index["count"])
        self.labels = np.asarray(index["labels"], dtype=np.int64)  # (count,)
        if self.labels.shape != (self.count,):
            raise CorruptCacheError(
                f"the index of {str(self.root)!r} lists {self.labels.shape[0]} labels for {self.count} items; "
                f"rebuild the index with `{command}`"
            )
        self._starts = np.asarray([s["start"] for s in index["shards"]], dtype=np.int64)  # (num_shards,)
        for i, entry in enumerate(index["shards"]):  # fail at construction for missing shards (cheap stats)
            path = self.root / entry["file"]
            if not path.is_file():
                raise CorruptCacheError(
                    f"cache shard {str(path)!r} is missing; rebuild it with `{command}` (finished shards are kept)"
                )
        stores_images = bool(index.get("images"))
        if load_images and not stores_images:
            raise CacheMismatchError(
                f"the feature cache {str(self.root)!r} was built with --no-images; it holds no pixels to load"
            )
        self.load_images = stores_images if load_images is None else bool(load_images)
        self.has_moments = bool(index.get("moments"))
        self.verify: str = _verify_mode(verify)
        self._handles: Dict[int, Any] = {}
        # shards already hashed, shared with DataLoader workers (fork or spawn) so that each
        # shard is hashed once per dataset, not once per worker and epoch
        self._verified = torch.zeros(len(index["shards"]), dtype=torch.bool).share_memory_()  # (num_shards,)

    def __len__(self) -> int:
        return self.count

    def _handle(self, shard: int) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            checksum = self.verify == "sha256" and not bool(self._verified[shard])
            handle = _open_shard(self.root, self.index, shard, checksum=checksum)
            if checksum:
                self._verified[shard] = True
            self._handles[shard] = handle
        return handle

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} is out of range for a cache of {self.count} items")
        index = int(index) % self.count
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        j = index - int(self._starts[shard])
        f = self._handle(shard)
        item: Dict[str, Any] = {}
        if self.load_images:
            item["image"] = f.get_slice("image")[j : j + 1][0]  # (C, R, R) uint8
        if self.has_moments:
            item["moments"] = f.get_slice("moments")[j : j + 1][0]  # (2c, h, w) float32
        item["y"] = torch.tensor(int(self.labels[index]), dtype=torch.long)
        item["features"] = {name: f.get_slice(key)[j : j + 1][0] for name, key in self._keys}  # (N, D) each
        _check_finite_item(item, self.root / self.index["shards"][shard]["file"], index, self.index["command"])
        return item

    def data_info(self) -> Any:
        """A :class:`repa.datasets.DataInfo` describing the training input this cache provides."""
        from .datasets import LATENT_SCALE, DataInfo

        idx = self.index
        num_classes = int(idx.get("num_classes") or (int(self.labels.max()) + 1 if self.count else 0))
        img = idx.get("images")
        channels = int(img["shape"][0]) if img else 3
        if self.has_moments:
            m = idx["moments"]
            return DataInfo(
                "latents", channels, self.resolution, int(m["latent_channels"]), int(m["shape"][1]), num_classes,
                float(m.get("latent_scale", LATENT_SCALE)), m.get("vae"), str(self.root),
            )
        return DataInfo("pixels", channels, self.resolution, channels, self.resolution, num_classes, LATENT_SCALE, None, str(self.root))

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}  # safetensors handles do not pickle; each process opens its own
        return state


# --------------------------------------------------------------------------------------------
# repa cache [verify DIR]
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``repa cache`` (build) and ``repa cache verify DIR``."""
    parser.add_argument("action", nargs="?", choices=["verify"], help="'verify DIR': check every shard against the index")
    parser.add_argument("directory", nargs="?", help="the cache folder to verify")
    parser.add_argument("--data", help="image folder (class subfolders = labels), IDX folder, or prepared latent folder")
    parser.add_argument("--encoders", help="comma-separated registry encoders, e.g. dinov2-vit-b,clip-vit-L")
    parser.add_argument("--out", help="the cache folder to write (re-running continues an unfinished build)")
    parser.add_argument("--resolution", type=int, default=None, help="center-crop size of image folders (e.g. 256)")
    parser.add_argument("--vae", default=None, help="local AutoencoderKL folder: also store SD-VAE latent moments")
    parser.add_argument("--dtype", default="fp16", choices=list(STORAGE_DTYPES), help="storage dtype of the targets (default: fp16)")
    parser.add_argument("--compute-dtype", default="fp32", choices=list(STORAGE_DTYPES),
                        help="dtype the encoders run in (default: fp32, what training computes online)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default: 64)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default: 1024)")
    parser.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                        help="a local weights file for one encoder (repeatable)")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                        help="random encoders seeded by --seed (tests, benchmarks); never for training")
    parser.add_argument("--seed", type=int, default=0, help="seed of random encoders with --no-pretrained (default: 0)")
    parser.add_argument("--no-images", dest="store_images", action="store_false",
                        help="do not store the pixels (allowed with --vae: the moments are the training input)")
    workers = min(4, os.cpu_count() or 1)
    parser.add_argument("--num-workers", type=int, default=workers,
                        help=f"DataLoader workers reading images (default: min(4, CPU count) = {workers})")
    parser.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    parser.add_argument("--no-checksums", dest="checksums", action="store_false",
                        help="verify: skip the sha256 of each shard (sizes, shapes and metadata only)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="image folders: skip (with a warning) files that cannot be decoded instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .video_cache import add_video_arguments  # --video: folders of clip frames (repa.video_cache)

    add_video_arguments(parser)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def main(args: argparse.Namespace) -> int:
    """Run ``repa cache`` (build) or ``repa cache verify DIR``; returns the exit status."""
    from . import video_cache

    if video_cache.handles(args):  # --video builds and video caches: repa.video_cache
        return video_cache.main(args)
    if args.action == "verify":
        if not args.directory:
            raise ConfigError("usage: repa cache verify DIR")
        problems = verify_cache(args.directory, checksums=args.checksums)
        if problems:
            for p in problems:
                print(f"repa cache verify: BAD: {p}", file=sys.stderr)
            print(f"repa cache verify: {len(problems)} problem(s) in {args.directory}", file=sys.stderr)
            return 1
        index = load_index(args.directory)
        print(f"repa cache verify: OK: {index['num_shards']} shard(s), {index['count']} items in {args.directory}")
        return 0
    if args.directory:
        raise ConfigError(f"unexpected argument {args.directory!r}; to verify a cache run `repa cache verify DIR`")
    missing = [flag for flag, value in (("--data", args.data), ("--encoders", args.encoders), ("--out", args.out)) if not value]
    if missing:
        raise ConfigError(f"repa cache needs {', '.join(missing)} (or `repa cache verify DIR`)")
    report = build_cache(
        args.data, args.out, args.encoders,
        resolution=args.resolution, dtype=args.dtype, compute_dtype=args.compute_dtype, vae=args.vae,
        batch_size=args.batch_size, shard_size=args.shard_size, weights=args.weights, pretrained=args.pretrained,
        seed=args.seed, store_images=args.store_images, num_workers=args.num_workers, device=args.device,
        progress=not args.no_progress, skip_bad_images=args.skip_bad_images,
    )
    if report.rank == 0:
        print(
            f"repa cache: {report.count} items in {report.num_shards} shard(s) at {report.out} "
            f"(built {len(report.built)}, of which {len(report.repaired)} damaged and rebuilt, kept {len(report.skipped)} "
            f"on rank 0); check with `repa cache verify {report.out}`",
            file=sys.stderr,
        )
    return 0
