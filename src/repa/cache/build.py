"""Building a feature cache: the plan of a build, the shards each rank encodes, the index.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from .._io import atomic_write
from ..errors import CacheMismatchError, ConfigError, CorruptCacheError
from .format import (
    CACHE_FORMAT,
    INDEX_NAME,
    STORAGE_DTYPES,
    PathLike,
    _atomic_json,
    _data_identity,
    _fingerprint,
    _human,
    _record_name,
    _sha256_file,
    _shard_name,
    build_image_dataset,
    bytes_per_image,
    storage_dtype_name,
)

_log = logging.getLogger("repa")

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
            from ..errors import WeightsNotFoundError

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
        from ..encoders import get_encoder_spec, locate_weights

        found, _ = locate_weights(get_encoder_spec(name))
        return {"source": "pretrained", "path": str(found) if found is not None else None}
    return {"source": "random", "seed": seed + position}


def _write_shard(out: Path, i: int, tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> Tuple[int, str]:
    """Write shard ``i`` atomically; returns (bytes, sha256)."""
    from safetensors.torch import save_file

    path = out / _shard_name(i)

    def write(tmp: str) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; give the permissions open() would

    atomic_write(path, write)  # fsync'd before the rename makes it visible
    return path.stat().st_size, _sha256_file(path)


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


@dataclass
class BuildPlan:
    """Everything a rank needs to build its shards: the dataset, the encoders' records and the settings.

    Made once by :func:`build_cache` from its arguments; the shard builder and the index writer
    read it instead of a long parameter list.
    """

    dataset: Dataset
    out: Path
    enc_records: List[Dict[str, Any]]
    specs: List[Any]
    settings: Dict[str, Any]
    info: Any
    fingerprint: str
    command: str
    count: int
    num_shards: int


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
    from .._distributed import init_distributed, shutdown_distributed

    t0 = time.time()
    plan = _plan_build(
        data, out, encoders, resolution=resolution, dtype=dtype, compute_dtype=compute_dtype, vae=vae,
        batch_size=batch_size, shard_size=shard_size, weights=weights, pretrained=pretrained, seed=seed,
        store_images=store_images, skip_bad_images=skip_bad_images,
    )
    dist_info = init_distributed(device)
    report = CacheBuildReport(
        out=plan.out, count=plan.count, num_shards=plan.num_shards, rank=dist_info.rank, world_size=dist_info.world_size
    )
    try:
        _run_build(plan, dist_info, report, num_workers=num_workers, progress=progress)
    finally:
        shutdown_distributed(dist_info)
    report.seconds = time.time() - t0
    return report


def _plan_build(
    data: PathLike,
    out: PathLike,
    encoders: Union[str, Sequence[str]],
    *,
    resolution: Optional[int],
    dtype: Union[str, torch.dtype],
    compute_dtype: Union[str, torch.dtype],
    vae: Optional[str],
    batch_size: int,
    shard_size: int,
    weights: Union[Mapping[str, PathLike], Sequence[str], None],
    pretrained: bool,
    seed: int,
    store_images: bool,
    skip_bad_images: bool,
) -> BuildPlan:
    """Check the settings, open the dataset and describe the build (same arguments as :func:`build_cache`)."""
    names = _parse_encoders(encoders)
    dtype_name = storage_dtype_name(dtype)
    compute_name = storage_dtype_name(compute_dtype)
    for what, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive int, got {value!r}")
    weights_map = _parse_weights(weights)

    from ..encoders import get_encoder_spec

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
    enc_records = _encoder_records(specs, res, compute_name, weights_map, pretrained, seed)
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
    return BuildPlan(
        dataset=dataset, out=out, enc_records=enc_records, specs=specs, settings=settings, info=info,
        fingerprint=fingerprint, command=command, count=count, num_shards=num_shards,
    )


def _encoder_records(
    specs: List[Any], res: int, compute_name: str, weights_map: Dict[str, str], pretrained: bool, seed: int
) -> List[Dict[str, Any]]:
    """One record per encoder: its shard key, token shape and grid, weights source and spec."""
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
    return enc_records


def _run_build(plan: BuildPlan, dist_info: Any, report: CacheBuildReport, *, num_workers: int, progress: bool) -> None:
    """Collective: check the folder, build this rank's unfinished shards, then rank 0 writes the index."""
    from .._distributed import barrier

    out, fingerprint, command, num_shards, count = plan.out, plan.fingerprint, plan.command, plan.num_shards, plan.count
    res, dtype_name, canonical = plan.settings["resolution"], plan.settings["dtype"], plan.settings["encoders"]
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
        _log.info(
            f"cache: {count} images at {res}px -> {out}: {_human(per_image)} of {dtype_name} targets per image, "
            f"{_human(per_image * count)} in all; {num_shards} shard(s) over {dist_info.world_size} process(es), "
            f"{len(report.skipped)} already finished here",
        )
    if pending:
        _build_shards(plan, pending, num_workers=num_workers, device=dist_info.device,
                      progress=progress and dist_info.is_main, rank=dist_info.rank, world=dist_info.world_size)
    report.built = pending
    barrier(dist_info)

    if dist_info.is_main:
        _write_index(plan)
    barrier(dist_info)


def _build_shards(
    plan: BuildPlan, pending: List[int], *, num_workers: int, device: torch.device, progress: bool, rank: int, world: int
) -> None:
    """Encode and write the shards in ``pending`` (this rank's unfinished ones)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ..encoders import create_encoder

    dataset, out, enc_records, specs, settings = plan.dataset, plan.out, plan.enc_records, plan.specs, plan.settings
    count, fingerprint, command = plan.count, plan.fingerprint, plan.command
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
        from ..datasets import load_vae

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
                from ..datasets import encode_moments

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
    from ..errors import CacheError

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


def _write_index(plan: BuildPlan) -> None:
    """Rank 0, after every shard is written: gather the shard records into ``index.json``."""
    from .._version import __version__

    out, num_shards, count, fingerprint, command = plan.out, plan.num_shards, plan.count, plan.fingerprint, plan.command
    enc_records, settings, info, dataset = plan.enc_records, plan.settings, plan.info, plan.dataset

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


