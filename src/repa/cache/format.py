"""The feature cache's format: names, dtypes, hashing, the index, reading and verifying shards.

See :mod:`repa.cache` for the folder layout. Used by the builder, the dataset and the CLI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .._io import atomic_write_text, temp_path
from ..errors import (
    CacheMismatchError,
    ConfigError,
    CorruptCacheError,
    DataNotFoundError,
)

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


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


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
    return temp_path(path)


def _atomic_json(path: Path, obj: Dict[str, Any], compact: Sequence[str] = ()) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``.

    Keys in ``compact`` (long lists such as the labels) go on one line at the end.
    """
    text = json.dumps({k: v for k, v in obj.items() if k not in compact}, indent=1)
    tail = "".join(f',\n "{k}": {json.dumps(obj[k], separators=(",", ":"))}' for k in compact if k in obj)
    text = text[: text.rindex("}")].rstrip() + tail + "\n}\n"
    atomic_write_text(path, text)


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
    from ..encoders import get_encoder_spec

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
    from ..datasets import open_dataset

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


