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

from .build import CacheBuildReport, build_cache
from .cli import add_arguments, main
from .dataset import CachedFeatureDataset
from .format import (
    CACHE_FORMAT,
    INDEX_NAME,
    STORAGE_DTYPES,
    VERIFY_MODES,
    _check_finite_item,  # noqa: F401  (benchmarks/cache_verify.py)
    _sha256_file,  # noqa: F401
    build_image_dataset,
    bytes_per_image,
    is_feature_cache,
    load_index,
    storage_dtype_name,
    verify_cache,
)

__all__ = [
    "CACHE_FORMAT",
    "STORAGE_DTYPES",
    "INDEX_NAME",
    "VERIFY_MODES",
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
