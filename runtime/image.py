"""Image loading and Qwen-VL preprocessing with Pillow + numpy only.

Preprocessing is bit-exact with the original (spec §3.1, Appendix 4): PIL bicubic *squash* to
SxS (aspect ratio not kept, no crop), float32 /255, CLIP mean/std, CHW. Loading is stricter than
the original (which did ``Image.open(path_or_url).convert("RGB")``):

* no URLs, ever (images only enter as explicit arguments);
* corrupt, truncated, empty and decompression-bomb files fail with one clear ``ImageError``;
* EXIF orientation is applied (``exif_transpose=True``), so phone photos are upright. This is a
  deliberate deviation; pass ``exif_transpose=False`` for the original's pixels;
* 16-bit greyscale is scaled to 8 bit (``v >> 8``) where PIL's ``convert`` would clip to 255
  (nearly all-white images). Everything else converts like ``.convert("RGB")`` (alpha dropped).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
_MEAN32 = np.asarray(MEAN, dtype=np.float32)
_STD32 = np.asarray(STD, dtype=np.float32)
DEFAULT_MAX_PIXELS = 50_000_000

ImageSource = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An image that cannot be used; the message names it and says what to do."""


def _name(src: Any) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, np.ndarray):
        return f"<array {src.shape} {src.dtype}>"
    return getattr(src, "filename", "") or f"<{type(src).__name__}>"


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB like ``.convert("RGB")``, except 16/32-bit integer greyscale is scaled (>> 8)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img)
        # "I" is 32-bit signed; PNG/TIFF 16-bit data lives in 0..65535 there too.
        a8 = (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if img.mode == "F":
        return img.convert("L").convert("RGB")  # PIL clips floats to 0..255
    return img.convert("RGB")


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(f"image array must be uint8, got {a.dtype}; convert it with "
                         f"(x * 255).clip(0, 255).astype(np.uint8) or similar")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        mode = "L"
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        mode = "RGB" if a.shape[2] == 3 else "RGBA"
    else:
        raise ImageError(f"image array must be HxW, HxWx3 or HxWx4 uint8, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"image array is empty (shape {a.shape}); pass a non-empty image")
    return Image.fromarray(np.ascontiguousarray(a), mode)


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS,
               exif_transpose: bool = True) -> Image.Image:
    """An 8-bit RGB PIL image from a path, encoded bytes, a PIL image or a uint8 array.

    Files are fully decoded here (``img.load()``), so a corrupt or truncated file fails now with
    an ``ImageError`` rather than later inside the model. Never opens URLs.
    """
    name = _name(src)
    if isinstance(src, np.ndarray):
        return to_rgb(_from_array(src))
    if isinstance(src, Image.Image):
        _check_pixels(src.width, src.height, name, max_pixels)
        return to_rgb(_transpose(src, name) if exif_transpose else src)
    if isinstance(src, (str, Path)):
        s = str(src)
        if "://" in s:
            raise ImageError(f"image {s}: URLs are never opened; download the file and pass its "
                             f"local path")
        p = Path(s)
        if not p.exists():
            raise ImageError(f"image file not found: {p}; check the path")
        if not p.is_file():
            raise ImageError(f"image path is not a file: {p}; pass an image file")
        fp: Any = p
    elif isinstance(src, (bytes, bytearray)):
        if not src:
            raise ImageError("image bytes are empty; pass the encoded file content")
        fp = io.BytesIO(bytes(src))
    else:
        raise ImageError(f"unsupported image type {type(src).__name__}; pass a path, bytes, a PIL "
                         f"image or a uint8 numpy array")
    return _open_decoded(fp, name, max_pixels, exif_transpose)


def _check_pixels(w: int, h: int, name: str, max_pixels: int) -> None:
    if w <= 0 or h <= 0:
        raise ImageError(f"image {name} is empty ({w}x{h}); pass a real image")
    if w * h > max_pixels:
        raise ImageError(f"image {name} is {w}x{h} = {w * h} pixels, more than max_pixels="
                         f"{max_pixels} (decompression bomb?); resize it or raise max_pixels")


def _transpose(img: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block must not reject a good image."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:
        log.warning("image %s: ignoring unreadable EXIF orientation (%s)", name, e)
        return img.copy()


def _open_decoded(fp: Any, name: str, max_pixels: int, exif_transpose: bool) -> Image.Image:
    """Open, check the declared size BEFORE decoding, decode fully, orient, convert to RGB."""
    try:
        # PIL itself warns above Image.MAX_IMAGE_PIXELS and raises at twice that; both caught
        # below (the warning only where warnings are errors). Our own limit is checked first.
        with Image.open(fp) as im:
            _check_pixels(im.width, im.height, name, max_pixels)
            im.load()
            # a new image independent of the file (closed on exit), EXIF still readable here
            img = _transpose(im, name) if exif_transpose else im.copy()
            return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image {name} is too large to decode safely ({e}); resize it "
                         f"first") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image or an unsupported format: {name}; pass a PNG, JPEG, "
                         f"WebP, BMP, GIF or TIFF file") from None
    except MemoryError:
        raise ImageError(f"out of memory decoding image {name}; pass a smaller image") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"corrupt or truncated image {name}: {type(e).__name__}: {e}; "
                         f"re-export or re-download the file") from None


def _check_size(image_size: int) -> int:
    if not isinstance(image_size, (int, np.integer)) or int(image_size) < 1:
        raise ImageError(f"image_size must be a positive int, got {image_size!r}")
    return int(image_size)


def preprocess(img: ImageSource, image_size: int = 448) -> np.ndarray:
    """Pixels ``[3, S, S]`` float32 exactly as the original transform makes them.

    ``img.resize((S, S), BICUBIC)`` on the RGB image, ``/255`` in float32, then
    ``(x - mean) / std`` with float32 constants (torchvision ToTensor + Normalize math).
    A PIL image is used as given (only converted to RGB, like the original); other inputs go
    through :func:`load_image` (EXIF orientation applied). Call ``load_image`` yourself to
    orient a PIL image.
    """
    s = _check_size(image_size)
    im = to_rgb(img) if isinstance(img, Image.Image) else load_image(img)
    a = np.asarray(im.resize((s, s), Image.BICUBIC), dtype=np.uint8)
    x = a.astype(np.float32) / np.float32(255.0)
    x = (x - _MEAN32) / _STD32
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def preprocess_batch(images: Sequence[ImageSource], image_size: int = 448) -> np.ndarray:
    """Stack :func:`preprocess` of each image: ``[N, 3, S, S]`` float32 (N may be 0)."""
    s = _check_size(image_size)
    out = np.empty((len(images), 3, s, s), dtype=np.float32)
    for i, im in enumerate(images):
        out[i] = preprocess(im, s)
    return out
