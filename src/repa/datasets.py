"""Training datasets: pixels, SD-VAE latents, and the clean images REPA's encoder sees.

A tool-level module (the cache, the probe and the SiT recipe read data through it); it was
``repa.sit.data``, which still re-exports every name.

Every dataset yields a dict with the CLEAN image the frozen encoder gets and the label:

    {"image": uint8 (C, H, W), "y": int64 ()}                       # pixel space, image folders
    {"image": uint8 (3, R, R), "y": int64 (), "moments": (2c, h, w)} # prepared latent datasets

The diffusion model's input is derived from that in the training loop (one place, so every
source shares it): pixels scaled to [-1, 1]; or SD-VAE latents ``(mean + std * eps) * 0.18215``
with a fresh ``eps`` every step (REPA_FACTS section 3), from stored moments or encoded on the
fly with ``--vae``. The encoder always receives the pixels, never latents: a prepared latent
dataset stores the center-cropped images beside the moments (``images.npy``) or, with
``store_images=False``, the source file of each item, re-read and re-cropped identically.

Three sources (:func:`open_dataset` picks one from ``--data``):

- (c) Fashion-MNIST / any IDX pair ``train-images-idx3-ubyte[.gz]`` + ``train-labels-idx1-ubyte[.gz]``
  (the default: ``/usr/share/datasets/fashion-mnist``), 1 channel, pixel space;
- (a) a folder of images whose class subfolders are the labels, ADM center-cropped to
  ``resolution``; pixel space, or SD-VAE latents encoded on the fly when ``vae`` is given;
- (b) a prepared latent folder written by :func:`prepare_latents` (deprecated: ``repa cache --vae``
  writes the one precompute format now; old folders still load, with a DeprecationWarning).
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ._images import IMAGE_EXTENSIONS, bad_image_message, center_crop, image_is_readable, list_images
from ._io import atomic_write, atomic_write_text
from .errors import ConfigError, CorruptImageError, DataNotFoundError, WeightsNotFoundError, require

__all__ = [
    "FASHION_MNIST_DIR",
    "LATENT_SCALE",
    "IMAGE_EXTENSIONS",
    "DataInfo",
    "read_idx",
    "write_idx",
    "load_idx_split",
    "ImageArrayDataset",
    "ImageFolderDataset",
    "LatentDataset",
    "center_crop",
    "load_vae",
    "vae_latent_shape",
    "encode_moments",
    "sample_latents",
    "decode_latents",
    "prepare_latents",
    "open_dataset",
    "images_to_model_input",
]

#: The deprecation note of the old latent folders (``prepare_latents`` / :class:`LatentDataset`).
LATENTS_DEPRECATED = (
    "prepared latent folders (python -m repa.sit.data prepare-latents, LatentDataset) are deprecated: "
    "precompute with `repa cache --vae VAE --data IMAGES --out DIR` and train with `repa train --data DIR`"
)

#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: SD-VAE latent scale used by SiT / REPA.
LATENT_SCALE = 0.18215
LATENT_FORMAT = "repa-latents/1"
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class DataInfo:
    """What a dataset feeds the model and the encoder.

    Attributes:
        kind: ``"pixels"`` (model input = image in [-1, 1]), ``"latents"`` (stored moments) or
            ``"vae"`` (moments encoded on the fly from the images).
        image_channels, image_size: the clean images (encoder input).
        input_channels, input_size: the diffusion model's input (pixels or latents).
        num_classes: number of labels (class subfolders, or 10 for Fashion-MNIST).
        latent_scale: factor applied to latents (0.18215), unused for pixels.
        vae: the VAE path or hub id for ``"latents"`` / ``"vae"`` (needed to decode samples).
        source: the resolved data location.
    """

    kind: str
    image_channels: int
    image_size: int
    input_channels: int
    input_size: int
    num_classes: int
    latent_scale: float = LATENT_SCALE
    vae: Optional[str] = None
    source: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open_maybe_gz(path: Path, mode: str = "rb"):
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (optionally ``.gz``): magic 0x0000, dtype code, ndim, big-endian int32 dims, data."""
    path = Path(path)
    with _open_maybe_gz(path) as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataNotFoundError(f"{str(path)!r} is not an IDX file (bad magic number {raw[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise DataNotFoundError(
            f"IDX file {str(path)!r} is truncated: header says {dims} ({count * dtype.itemsize} bytes), "
            f"found {len(raw) - offset} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzip-compressed when the name ends in ``.gz``), atomically."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ConfigError(f"write_idx writes uint8 arrays, got dtype {array.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)

    def write(tmp: str) -> None:
        with (gzip.open(tmp, "wb") if path.suffix == ".gz" else open(tmp, "wb")) as fh:
            fh.write(header + array.tobytes())

    return atomic_write(path, write)


def _idx_file(root: Path, stem: str) -> Optional[Path]:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def load_idx_split(root: PathLike, split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 of an MNIST-style folder.

    ``split`` is ``"train"`` (``train-*``) or ``"test"`` (``t10k-*``); files may be gzipped.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    images_file = _idx_file(root, f"{prefix}-images-idx3-ubyte")
    labels_file = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
    if images_file is None or labels_file is None:
        raise DataNotFoundError(
            f"no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz] in {str(root)!r}; pass the "
            "folder holding the IDX files with --data (Fashion-MNIST: `apt-get install dataset-fashion-mnist` "
            f"puts them in {FASHION_MNIST_DIR})"
        )
    images = read_idx(images_file)  # (N, H, W)
    labels = read_idx(labels_file).astype(np.int64)  # (N,)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataNotFoundError(
            f"IDX images {images.shape} and labels {labels.shape} in {str(root)!r} do not pair up "
            "(expected (N, H, W) and (N,))"
        )
    return images[:, None].copy(), labels  # (N, 1, H, W), (N,)


class ImageArrayDataset(Dataset):
    """In-memory uint8 images (N, C, H, W) with labels (N,): yields ``{"image", "y"}``."""

    def __init__(self, images: Union[np.ndarray, torch.Tensor], labels: Union[np.ndarray, torch.Tensor]) -> None:
        images = torch.as_tensor(np.asarray(images))
        labels = torch.as_tensor(np.asarray(labels)).long()
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ConfigError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ConfigError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"image": self.images[index], "y": self.labels[index]}


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _drop_unreadable(root: Path, items: List[Tuple[str, int]]) -> List[Tuple[str, int]]:
    """``items`` without the files that do not decode, each skipped with a warning (``--skip-bad-images``)."""
    import logging

    log = logging.getLogger("repa")
    kept = []
    for rel, label in items:
        exc = image_is_readable(root / rel)
        if exc is None:
            kept.append((rel, label))
        else:
            log.warning("skipping the unreadable image %s (%s: %s)", root / rel, type(exc).__name__, exc)
    if len(kept) < len(items):
        log.warning("--skip-bad-images: skipped %d of %d images in %s", len(items) - len(kept), len(items), root)
    return kept


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/...`` center-cropped to ``resolution``: yields ``{"image": uint8 (3, R, R), "y"}``.

    Labels are the indices of the sorted class subfolder names (``self.classes``); a folder
    without subfolders is one class.
    """

    def __init__(self, root: PathLike, resolution: int, skip_bad_images: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"image folder {str(root)!r} does not exist")
        if not isinstance(resolution, int) or resolution < 1:
            raise ConfigError(f"resolution must be a positive int for an image folder, got {resolution!r}")
        self.resolution = resolution
        self.classes, self.items = list_images(self.root)
        if skip_bad_images:
            self.items = _drop_unreadable(self.root, self.items)
        if not self.items:
            raise DataNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(root)!r} or its class subfolders"
            )

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> np.ndarray:
        """The cropped image ``index`` as (R, R, 3) uint8."""
        from PIL import Image

        rel, _ = self.items[index]
        path = self.root / rel
        try:
            with Image.open(path) as img:
                return center_crop(img, self.resolution)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL: truncated, not an image, bad header
            raise CorruptImageError(bad_image_message(path, exc)) from exc

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        arr = self.load(index)  # (R, R, 3)
        if not arr.flags.writeable:  # a view of PIL's buffer: torch wants memory it may own
            arr = arr.copy()
        image = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, R, R)
        return {"image": image, "y": torch.tensor(self.items[index][1], dtype=torch.long)}


# --------------------------------------------------------------------------------------------
# SD-VAE
# --------------------------------------------------------------------------------------------


def load_vae(path_or_id: str, device: Union[str, torch.device, None] = None) -> Any:
    """diffusers ``AutoencoderKL`` from a local folder or the Hugging Face cache, frozen, in eval mode.

    Nothing is downloaded when ``HF_HUB_OFFLINE=1``; a miss raises
    :class:`~repa.errors.WeightsNotFoundError` saying how to fetch it.
    """
    diffusers = require("diffusers", "vae")
    local = os.path.isdir(os.path.expanduser(path_or_id))
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(os.path.expanduser(path_or_id) if local else path_or_id)
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(
            f"cannot load the VAE {path_or_id!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "pass --vae with a local folder holding config.json and the weights, or fill the Hugging Face cache "
            f"on a machine with network (`hf download {path_or_id}`, or `huggingface-cli download {path_or_id}` with "
            "huggingface-hub < 0.34) and copy it into this machine's cache"
        ) from exc
    vae.eval().requires_grad_(False)
    if device is not None:
        vae.to(device)
    return vae


def vae_latent_shape(vae: Any, image_size: int) -> Tuple[int, int, int]:
    """(channels, h, w) of the latents of ``image_size`` images: downsampling 2^(len(blocks) - 1)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ConfigError(f"image size {image_size} is not divisible by the VAE's downsampling factor {factor}")
    c = int(vae.config.latent_channels)
    return c, image_size // factor, image_size // factor


@torch.no_grad()
def encode_moments(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, R, R) -> posterior moments ``cat(mean, std)`` (B, 2c, h, w) float32."""
    x = images.to(device=vae.device, dtype=vae.dtype) / 127.5 - 1.0  # (B, 3, R, R) in [-1, 1]
    dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()  # (B, 2c, h, w)


def sample_latents(moments: torch.Tensor, eps: torch.Tensor, scale: float = LATENT_SCALE) -> torch.Tensor:
    """One posterior sample, scaled: ``(mean + std * eps) * scale``; moments (B, 2c, h, w), eps (B, c, h, w)."""
    mean, std = moments.float().chunk(2, dim=1)  # 2 x (B, c, h, w)
    return (mean + std * eps) * scale  # (B, c, h, w)


@torch.no_grad()
def decode_latents(vae: Any, z: torch.Tensor, scale: float = LATENT_SCALE) -> torch.Tensor:
    """Scaled latents (B, c, h, w) -> images (B, 3, R, R) in [-1, 1] (not clamped)."""
    return vae.decode((z / scale).to(device=vae.device, dtype=vae.dtype)).sample.float()


def images_to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1], the pixel-space model input."""
    return images.float() / 127.5 - 1.0  # (B, C, H, W)


# --------------------------------------------------------------------------------------------
# Prepared latent datasets
# --------------------------------------------------------------------------------------------


class LatentDataset(Dataset):
    """A folder written by :func:`prepare_latents`: yields ``{"moments", "image", "y"}``.

    ``moments`` is (2c, h, w) float32 (posterior mean then std); ``image`` the clean (3, R, R)
    uint8 image for the encoder, from ``images.npy`` or re-read from the recorded source file.
    """

    def __init__(self, root: PathLike) -> None:
        warnings.warn(LATENTS_DEPRECATED, DeprecationWarning, stacklevel=2)
        self.root = Path(root)
        meta_file = self.root / "meta.json"
        if not meta_file.is_file():
            raise DataNotFoundError(
                f"{str(root)!r} is not a prepared latent dataset (no meta.json); write one with "
                "`python -m repa.sit.data prepare-latents --data IMAGES --out DIR --vae ID`"
            )
        self.meta: Dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("format") != LATENT_FORMAT:
            raise DataNotFoundError(f"{str(meta_file)!r} has format {self.meta.get('format')!r}, expected {LATENT_FORMAT!r}")
        self.moments = np.load(self.root / "moments.npy", mmap_mode="r", allow_pickle=False)  # (N, 2c, h, w)
        self.labels = np.load(self.root / "labels.npy", allow_pickle=False)  # (N,)
        self.count = int(self.meta["count"])
        if self.moments.shape[0] != self.count or self.labels.shape[0] != self.count:
            raise DataNotFoundError(
                f"latent dataset {str(root)!r} is incomplete: meta.json says {self.count} items, moments.npy has "
                f"{self.moments.shape[0]}, labels.npy {self.labels.shape[0]}; prepare it again"
            )
        self.resolution = int(self.meta["resolution"])
        self._images: Optional[np.ndarray] = None
        self._files: Optional[List[str]] = None
        if self.meta["images"] == "images.npy":
            self._images = np.load(self.root / "images.npy", mmap_mode="r", allow_pickle=False)  # (N, 3, R, R)
        else:
            self._files = json.loads((self.root / "files.json").read_text())
            self._source = Path(self.meta["source"])

    def __len__(self) -> int:
        return self.count

    def _image(self, index: int) -> torch.Tensor:
        if self._images is not None:
            return torch.from_numpy(np.array(self._images[index]))  # (3, R, R)
        from PIL import Image

        assert self._files is not None
        path = self._source / self._files[index]
        if not path.is_file():
            raise DataNotFoundError(
                f"source image {str(path)!r} of the latent dataset {str(self.root)!r} is missing; the dataset was "
                "prepared without storing images, so the source folder must stay in place (or prepare it again "
                "with images stored)"
            )
        with Image.open(path) as img:
            return torch.from_numpy(center_crop(img, self.resolution)).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {
            "moments": torch.from_numpy(np.array(self.moments[index], dtype=np.float32)),  # (2c, h, w)
            "image": self._image(index),  # (3, R, R) uint8
            "y": torch.tensor(int(self.labels[index]), dtype=torch.long),
        }


def prepare_latents(
    data: PathLike,
    out: PathLike,
    vae: Union[str, Any],
    resolution: int = 256,
    *,
    batch_size: int = 32,
    store_images: bool = True,
    num_workers: int = 0,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
) -> Path:
    """Encode an image folder once into SD-VAE posterior moments: the latent dataset (b).

    Writes into ``out``: ``moments.npy`` (N, 2c, h, w) float32 (mean then std of the posterior,
    so training draws a fresh latent every step), ``labels.npy`` (N,) int64, the clean images
    ``images.npy`` (N, 3, R, R) uint8 (or, with ``store_images=False``, ``files.json``: each
    item's source file, re-read and re-cropped when training), then ``meta.json`` last, so a
    folder with ``meta.json`` is complete. Arrays are written under temporary names and renamed.

    ``vae`` is a diffusers ``AutoencoderKL`` or a local path / hub id for :func:`load_vae`.
    """
    warnings.warn(LATENTS_DEPRECATED, DeprecationWarning, stacklevel=2)
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    source = ImageFolderDataset(data, resolution)
    vae_name = vae if isinstance(vae, str) else getattr(vae.config, "_name_or_path", "") or "AutoencoderKL"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_vae(vae, device) if isinstance(vae, str) else vae.to(device).eval()
    c, h, w = vae_latent_shape(model, resolution)
    n = len(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the folder is incomplete until the end
    tmp = lambda name: out / f".{name}.tmp{os.getpid()}"  # noqa: E731
    moments = np.lib.format.open_memmap(tmp("moments.npy"), mode="w+", dtype=np.float32, shape=(n, 2 * c, h, w))
    images = (
        np.lib.format.open_memmap(tmp("images.npy"), mode="w+", dtype=np.uint8, shape=(n, 3, resolution, resolution))
        if store_images
        else None
    )
    labels = np.array([label for _, label in source.items], dtype=np.int64)
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    start = 0
    for batch in tqdm(loader, desc="encode latents", unit="batch", disable=not progress):
        img = batch["image"]  # (B, 3, R, R) uint8
        m = encode_moments(model, img)  # (B, 2c, h, w)
        moments[start : start + img.shape[0]] = m.cpu().numpy()
        if images is not None:
            images[start : start + img.shape[0]] = img.numpy()
        start += img.shape[0]
    moments.flush()
    del moments
    os.replace(tmp("moments.npy"), out / "moments.npy")  # memmaps are filled in place, then renamed as repa._io does
    if images is not None:
        images.flush()
        del images
        os.replace(tmp("images.npy"), out / "images.npy")
    else:
        _atomic_text(out / "files.json", json.dumps([rel for rel, _ in source.items]))
    def write_labels(tmp_name: str) -> None:
        with open(tmp_name, "wb") as fh:  # a file handle: np.save would append ".npy" to the name
            np.save(fh, labels)

    atomic_write(out / "labels.npy", write_labels)
    meta = {
        "format": LATENT_FORMAT,
        "count": n,
        "resolution": resolution,
        "latent_shape": [c, h, w],
        "latent_scale": LATENT_SCALE,
        "vae": str(vae_name),
        "classes": source.classes,
        "images": "images.npy" if store_images else "files",
        "source": str(Path(data).resolve()),
    }
    _atomic_text(out / "meta.json", json.dumps(meta, indent=2))
    return out


def _atomic_text(path: Path, text: str) -> None:
    atomic_write_text(path, text, fsync=False)


# --------------------------------------------------------------------------------------------
# Choosing the source
# --------------------------------------------------------------------------------------------


def _has_images(root: Path) -> bool:
    for _, _, files in os.walk(root):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def open_dataset(
    data: Optional[PathLike] = None,
    *,
    resolution: Optional[int] = None,
    vae: Optional[str] = None,
    latent_scale: float = LATENT_SCALE,
    vae_model: Any = None,
    skip_bad_images: bool = False,
) -> Tuple[Dataset, DataInfo]:
    """The training dataset and its :class:`DataInfo`, from what ``--data`` points at.

    - ``None``: Fashion-MNIST in :data:`FASHION_MNIST_DIR` (pixel space);
    - a folder with ``meta.json``: a prepared latent dataset (b);
    - a folder with ``train-images-idx3-ubyte[.gz]``: an IDX dataset, pixel space (c);
    - a folder of images (class subfolders = labels), center-cropped to ``resolution`` (a):
      pixel space, or latents encoded on the fly when ``vae`` is given.

    ``vae_model`` (an ``AutoencoderKL``) is only used to read the latent shape for (a) with ``vae``.
    An image that cannot be decoded raises :class:`CorruptImageError` naming it when read;
    ``skip_bad_images`` decodes every image of (a) once here and leaves out (with a warning) those that fail.
    """
    root = Path(os.path.expanduser(str(data))) if data is not None else Path(FASHION_MNIST_DIR)
    if not root.exists():
        if data is None:
            raise DataNotFoundError(
                f"Fashion-MNIST is not in {FASHION_MNIST_DIR}; install it with `apt-get install -y "
                "dataset-fashion-mnist`, or pass --data DIR holding train-images-idx3-ubyte.gz and "
                "train-labels-idx1-ubyte.gz"
            )
        raise DataNotFoundError(f"--data {str(data)!r} does not exist; pass a folder of images, IDX files or latents")
    if not root.is_dir():
        raise DataNotFoundError(f"--data {str(data)!r} is a file; pass a folder (images, IDX files or prepared latents)")

    if (root / "meta.json").is_file():
        ds = LatentDataset(root)
        c, h, _ = ds.meta["latent_shape"]
        if resolution is not None and resolution != ds.resolution:
            raise ConfigError(
                f"--resolution {resolution} does not match the latent dataset {str(root)!r} (prepared at "
                f"{ds.resolution}); drop --resolution or prepare the data again"
            )
        info = DataInfo(
            kind="latents",
            image_channels=3,
            image_size=ds.resolution,
            input_channels=int(c),
            input_size=int(h),
            num_classes=len(ds.meta["classes"]),
            latent_scale=float(ds.meta.get("latent_scale", latent_scale)),
            vae=vae or ds.meta.get("vae"),
            source=str(root),
        )
        return ds, info

    if _idx_file(root, "train-images-idx3-ubyte") is not None:
        if vae is not None:
            raise ConfigError(
                f"--vae was given but {str(root)!r} holds IDX images (1 channel, pixel space); drop --vae"
            )
        images, labels = load_idx_split(root, "train")
        size = images.shape[-1]
        if images.shape[-2] != size:
            raise ConfigError(f"IDX images must be square, got {images.shape[-2]}x{size}")
        if resolution is not None and resolution != size:
            raise ConfigError(
                f"--resolution {resolution} does not match the IDX images in {str(root)!r} ({size}x{size}); "
                "drop --resolution"
            )
        num_classes = int(labels.max()) + 1
        info = DataInfo("pixels", 1, size, 1, size, num_classes, latent_scale, None, str(root))
        return ImageArrayDataset(images, labels), info

    if _has_images(root):
        if resolution is None:
            raise ConfigError(
                f"{str(root)!r} is an image folder: pass --resolution (e.g. 256) to center-crop its images"
            )
        ds = ImageFolderDataset(root, resolution, skip_bad_images=skip_bad_images)
        if vae is None:
            info = DataInfo("pixels", 3, resolution, 3, resolution, len(ds.classes), latent_scale, None, str(root))
        else:
            model = vae_model if vae_model is not None else load_vae(vae, "cpu")
            c, h, _ = vae_latent_shape(model, resolution)
            info = DataInfo("vae", 3, resolution, c, h, len(ds.classes), latent_scale, vae, str(root))
        return ds, info

    raise DataNotFoundError(
        f"--data {str(root)!r} holds no images, no IDX files (train-images-idx3-ubyte[.gz]) and no prepared "
        "latents (meta.json); point it at one of these"
    )
