"""Reading image files, shared by the tools and the recipe: extensions, listing, ADM center crop.

Lives at the bottom of the package (no ``repa`` imports but :mod:`repa.errors`), so the cache,
``repa fd`` and the SiT datasets read images the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "center_crop", "list_images", "bad_image_message", "image_is_readable"]

PathLike = Union[str, "os.PathLike[str]"]

#: The file suffixes read as images (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def center_crop(image: Any, size: int) -> np.ndarray:
    """ADM's center crop of a PIL image to ``size`` x ``size``, returns (size, size, 3) uint8 RGB.

    Halve with a box filter while the short side is at least 2 * size, resize the short side to
    ``size`` with bicubic, then crop the center (the preprocessing of ADM, DiT, SiT and REPA).
    """
    from PIL import Image

    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)  # (H', W', 3)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])  # (size, size, 3)


def list_images(root: Path) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(class names, [(relative path, label)]): class subfolders are labels; loose images are class 0."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items: List[Tuple[str, int]] = []
    if classes:
        for label, name in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(root / name)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        items.append((os.path.relpath(os.path.join(dirpath, f), root), label))
    else:
        items = [(f, 0) for f in sorted(os.listdir(root)) if f.lower().endswith(IMAGE_EXTENSIONS)]
        classes = [root.name]
    return classes, items


def bad_image_message(path: PathLike, exc: BaseException) -> str:
    """The one-line error for an image file that cannot be decoded: the file, the reason, the fixes."""
    return (
        f"cannot decode the image {str(path)!r} ({type(exc).__name__}: {exc}); replace or delete the file, "
        "or pass --skip-bad-images to skip unreadable files with a warning"
    )


def image_is_readable(path: PathLike) -> Optional[BaseException]:
    """None if ``path`` decodes fully as an image, else the error (``Image.load`` reads every byte)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        return exc
    return None
