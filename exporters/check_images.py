"""The images an exported vision engine is checked on: real photographs by default, preprocessed
exactly as the runtime does (``runtime.image``, the one implementation), so the export-time check
sees the pixels a deployed bundle will."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from runtime.image import load_image, preprocess

from .vision_errors import VisionExportError

DEFAULT_CHECK_IMAGES = ("astronaut", "chelsea", "coffee")


def _open_image(item: Any) -> tuple[str, Any]:
    from PIL import Image

    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        name, img = item
        return name, _open_image(img)[1]
    if isinstance(item, (str, Path)):
        s = str(item)
        if not os.path.exists(s):
            import skimage.data

            if hasattr(skimage.data, s):  # a skimage.data photo by name
                return s, getattr(skimage.data, s)()
            raise FileNotFoundError(f"check image not found: {s}")
        return Path(s).name, load_image(s)
    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or "image", item
    return "array", np.asarray(item)


def check_pixels(images: Iterable[Any] | None, image_size: int) -> tuple[list[str], np.ndarray]:
    """Names and preprocessed pixels ``[N,3,S,S]`` float32 of the check images.

    ``images`` items: a ``skimage.data`` photo name ("astronaut"), a file path, a PIL image, an
    HxWx3 uint8 array, or a ``(name, image)`` pair. Default: three real photographs.
    """
    items = list(images) if images is not None else list(DEFAULT_CHECK_IMAGES)
    if not items:
        raise ValueError("at least one check image is needed")
    names, arrays = [], []
    for it in items:
        name, img = _open_image(it)
        a = np.asarray(preprocess(img, image_size), dtype=np.float32)
        if a.shape != (3, image_size, image_size):
            raise VisionExportError(f"preprocessing gave {a.shape} for {name}, expected "
                                    f"(3, {image_size}, {image_size})")
        names.append(name)
        arrays.append(a)
    return names, np.stack(arrays)
