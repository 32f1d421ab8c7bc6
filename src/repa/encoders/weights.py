"""Where an encoder's weights live on this machine, and the error when they do not.

Lookup order for ``create_encoder(name, pretrained=True)`` (first hit wins), all checked before
any network is built, so a miss costs file-system checks only:

1. ``$REPA_HOME/encoders/<name>.{safetensors,pth,pt,pth.tar,bin}`` (``REPA_HOME`` defaults to
   ``~/.cache/repa``): the place for local-only weights and for copied files;
2. a file shipped inside the package (``repa/encoders/assets/``), for entries that declare one;
3. the Hugging Face cache (``cache_dir`` or the default hub cache) for the entry's hub repo;
4. the torch hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``) and ``cache_dir`` for the
   file name of the entry's original URL (where ``torch.hub`` itself would have saved it);
5. a download, only when ``HF_HUB_OFFLINE`` is not set.

Otherwise :class:`~repa.errors.WeightsNotFoundError` names the encoder, every place looked
at, the command that fetches the weights and the ``weights=`` alternative.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

from .._io import atomic_write
from ..errors import WeightsNotFoundError
from .spec import EncoderSpec

__all__ = [
    "repa_home",
    "local_weights_file",
    "locate_weights",
    "resolve_weights",
    "hub_offline",
    "WEIGHT_SUFFIXES",
]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".pth.tar", ".bin")
PathLike = Union[str, "os.PathLike[str]"]


def repa_home() -> Path:
    """``$REPA_HOME`` (default ``~/.cache/repa``): where `repa` keeps files it owns."""
    return Path(os.environ.get("REPA_HOME") or "~/.cache/repa").expanduser()


def local_weights_file(spec: EncoderSpec) -> Path:
    """Default local weights file of an encoder spec: ``$REPA_HOME/encoders/<name>.safetensors``."""
    return repa_home() / "encoders" / f"{spec.name.lower()}.safetensors"


def hub_offline() -> bool:
    """Whether downloads are disabled (``HF_HUB_OFFLINE`` set to a true value)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:  # huggingface_hub reads the variable once, at import: honour that too
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface-hub is a dependency
        return False


def _local_candidates(spec: EncoderSpec) -> List[Path]:
    stem = repa_home() / "encoders" / spec.name.lower()
    paths = [Path(str(stem) + suffix) for suffix in WEIGHT_SUFFIXES]
    if spec.shipped_asset:
        paths.append(Path(__file__).resolve().parent / "assets" / spec.shipped_asset)
    return paths


def _url_filename(url: str) -> str:
    return url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]


def _url_candidates(spec: EncoderSpec, cache_dir: Optional[PathLike]) -> List[Path]:
    if not spec.url:
        return []
    import torch

    filename = _url_filename(spec.url)
    dirs = [Path(cache_dir)] if cache_dir is not None else []
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return [d / filename for d in dirs]


def _hf_cache_dir(cache_dir: Optional[PathLike]) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hf_cached(spec: EncoderSpec, cache_dir: Optional[PathLike]) -> Optional[Path]:
    if not spec.hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in spec.hf_filenames:
        hit = try_to_load_from_cache(spec.hf_hub_id, filename, cache_dir=None if cache_dir is None else str(cache_dir))
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    return None


def locate_weights(spec: EncoderSpec, cache_dir: Optional[PathLike] = None) -> Tuple[Optional[Path], List[str]]:
    """Find ``spec``'s weights on this machine without any network access.

    Returns:
        ``(path or None, places)``: the first file found and a description of every place
        looked at, in order (used by the error message and by ``repa encoders``).
    """
    places: List[str] = []
    for path in _local_candidates(spec):
        if path.is_file():
            return path, places
    stem = repa_home() / "encoders" / spec.name.lower()
    places.append(f"{stem}{{{','.join(WEIGHT_SUFFIXES)}}}")
    if spec.shipped_asset:
        places.append(str(Path(__file__).resolve().parent / "assets" / spec.shipped_asset))
    if spec.hf_hub_id:
        hit = _hf_cached(spec, cache_dir)
        if hit is not None:
            return hit, places
        places.append(
            f"Hugging Face cache {_hf_cache_dir(cache_dir)} "
            f"(repo {spec.hf_hub_id}, files {', '.join(spec.hf_filenames)})"
        )
    for path in _url_candidates(spec, cache_dir):
        if path.is_file():
            return path, places
        places.append(str(path))
    return None, places


def _fetch_hint(spec: EncoderSpec) -> str:
    if spec.hf_hub_id:
        return (
            f"on a machine with network run `hf download {spec.hf_hub_id}` (huggingface-hub < 0.34: "
            f"`huggingface-cli download {spec.hf_hub_id}`) and copy the folder "
            f"models--{spec.hf_hub_id.replace('/', '--')} of its Hugging Face cache (~/.cache/huggingface/hub) "
            f"into this machine's cache (or point HF_HUB_CACHE / cache_dir= at it)"
            + (
                f"; or copy the original checkpoint {spec.url} to "
                f"{repa_home() / 'encoders' / (spec.name.lower() + _suffix_of(spec.url))}"
                if spec.url
                else ""
            )
        )
    if spec.url:
        return (
            f"download {spec.url} on a machine with network (e.g. `curl -LO {spec.url}`) and copy it to "
            f"{repa_home() / 'encoders' / (spec.name.lower() + _suffix_of(spec.url))}"
        )
    return f"put the weights file at {repa_home() / 'encoders' / (spec.name.lower() + '.safetensors')} (or .pth)"


def _suffix_of(url: str) -> str:
    name = _url_filename(url)
    for suffix in sorted(WEIGHT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ".pth"


def weights_not_found(spec: EncoderSpec, places: List[str], reason: str) -> WeightsNotFoundError:
    """The error for a miss: encoder, reason, where we looked, how to fetch, ``weights=``."""
    layout = f" (the original {spec.checkpoint_layout} checkpoint layout is accepted)"
    lines = [
        f"no weights for encoder {spec.name!r} on this machine ({reason}).",
        "Looked in: " + "; ".join(places) + ".",
        "To fix: " + _fetch_hint(spec) + ";",
        f"or pass a local file: create_encoder({spec.name!r}, weights='/path/to/weights.safetensors')"
        + (layout if spec.checkpoint_layout != "timm" else "")
        + "; or pretrained=False for random weights.",
    ]
    if spec.notes:
        lines.append(f"Note: {spec.notes}")
    return WeightsNotFoundError(" ".join(lines))


def _download(spec: EncoderSpec, cache_dir: Optional[PathLike]) -> Path:
    if spec.hf_hub_id:
        from huggingface_hub import hf_hub_download

        last: Optional[BaseException] = None
        for filename in spec.hf_filenames:
            try:
                return Path(hf_hub_download(spec.hf_hub_id, filename, cache_dir=None if cache_dir is None else str(cache_dir)))
            except Exception as exc:  # a missing file name: try the next one
                last = exc
        assert last is not None
        raise last
    assert spec.url
    import torch

    target_dir = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / _url_filename(spec.url)
    url = spec.url
    return atomic_write(target, lambda tmp: torch.hub.download_url_to_file(url, tmp, progress=True))


def resolve_weights(spec: EncoderSpec, cache_dir: Optional[PathLike] = None) -> Path:
    """The local weights file of ``spec``: found, or downloaded when downloads are allowed.

    Raises:
        WeightsNotFoundError: nothing local and (offline, no source, or the download failed).
    """
    path, places = locate_weights(spec, cache_dir)
    if path is not None:
        return path
    if not spec.hf_hub_id and not spec.url:
        raise weights_not_found(spec, places, "it has no download source: local weights only")
    if hub_offline():
        raise weights_not_found(spec, places, "not in any local cache and HF_HUB_OFFLINE=1 forbids downloads")
    try:
        return _download(spec, cache_dir)
    except Exception as exc:
        raise weights_not_found(spec, places, f"download failed: {type(exc).__name__}: {exc}") from exc
