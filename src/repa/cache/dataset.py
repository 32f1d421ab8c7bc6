"""Reading a feature cache in training: :class:`CachedFeatureDataset`.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import CacheMismatchError, CorruptCacheError
from .format import (
    STORAGE_DTYPES,
    PathLike,
    _check_finite_item,
    _open_shard,
    _verify_mode,
    load_index,
    storage_dtype_name,
)

_log = logging.getLogger("repa")

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
        for entry in index["shards"]:  # fail at construction for missing shards (cheap stats)
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
        from ..datasets import LATENT_SCALE, DataInfo

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


