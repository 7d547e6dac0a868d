"""Image loading and Qwen-VL preprocessing with Pillow + numpy only.

Preprocessing is bit-exact with the original ``visual.py`` transform: PIL bicubic *squash* to
SxS (aspect ratio not kept, no crop), float32 /255, CLIP mean/std, CHW. Loading is stricter than
the original (which did ``Image.open(path_or_url).convert("RGB")``):

* no URLs, ever (images only enter as explicit arguments);
* only PNG, JPEG (incl. MPO), WebP, BMP, GIF and TIFF are decoded, recognised by content (Pillow
  is asked to try only those plugins), so no other decoder ever sees untrusted bytes (EPS would
  run Ghostscript; PSD, ICO, SGI, ... are rarely tested decoders). Other formats: ``ImageError``;
* the work per image is bounded before decoding: ``max_pixels`` and the decoded raster's bytes
  (pixels x bytes per pixel of its mode, ``max_bytes``), so a 95 KB 16-bit PNG cannot ask for GBs;
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

from .errors import EdgeError

log = logging.getLogger(__name__)

MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
_MEAN32 = np.asarray(MEAN, dtype=np.float32)
_STD32 = np.asarray(STD, dtype=np.float32)
DEFAULT_MAX_PIXELS = 50_000_000
#: decoded raster bytes allowed per image: 50 MP of 32-bit pixels (RGBA, CMYK, "I", "F")
DEFAULT_MAX_BYTES = 4 * DEFAULT_MAX_PIXELS
#: Pillow format ids decoded from files and bytes (MPO: the multi-picture JPEG phones write)
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF")
_OPEN_WITH = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # the JPEG plugin also opens MPO
# magic bytes of formats people try, to name what was refused
_REFUSED_MAGIC = ((b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"),
                  (b"8BPS", "Photoshop PSD"), (b"\x00\x00\x01\x00", "ICO"),
                  (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"),
                  (b"<svg", "SVG"), (b"<?xml", "XML/SVG"), (b"\x01\xda", "SGI"),
                  (b"qoif", "QOI"), (b"DDS ", "DDS"))

ImageSource = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]


class ImageError(EdgeError, ValueError):
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
        # "I" is 32-bit signed; PNG/TIFF 16-bit data lives in 0..65535 there too. Shift in the
        # array's own width (no int64 copy: 8x fewer bytes for a 16-bit image).
        if a.dtype.kind == "i":
            a = np.clip(a, 0, 65535)
        a8 = (a >> 8).astype(np.uint8)
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
               exif_transpose: bool = True, max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    """An 8-bit RGB PIL image from a path, encoded bytes, a PIL image or a uint8 array.

    Files are fully decoded here (``img.load()``), so a corrupt or truncated file fails now with
    an ``ImageError`` rather than later inside the model. Never opens URLs. Files and bytes must
    be one of :data:`FORMATS` (by content); a PIL image is the caller's and is used as given.
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
    return _open_decoded(fp, name, max_pixels, exif_transpose, max_bytes)


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


def _raster_bytes(im: Image.Image) -> int:
    """Bytes of the decoded raster: pixels x bands x bytes per band of the image's mode."""
    from PIL import ImageMode

    try:
        m = ImageMode.getmode(im.mode)
        per_pixel = len(m.bands) * np.dtype(m.typestr).itemsize
    except (KeyError, TypeError, ValueError):
        per_pixel = 4
    return im.width * im.height * per_pixel


def _check_bytes(im: Image.Image, name: str, max_bytes: int) -> None:
    need = _raster_bytes(im)
    if need > max_bytes:
        raise ImageError(f"image {name} is {im.width}x{im.height} {im.mode} = {need / 1e6:.0f} MB "
                         f"decoded, more than max_bytes={max_bytes / 1e6:.0f} MB; resize it or "
                         "convert it to 8 bits per channel")


def _decode_16bit_png_as_8bit(im: Image.Image) -> None:
    """Let Pillow's unpacker keep only the high byte of a 16-bit greyscale PNG while decoding.

    The pixels equal ``to_rgb``'s ``v >> 8`` exactly (tests check it), at a quarter of the memory
    and time of decoding to ``I;16`` and shifting afterwards. Any other image is left as is.
    """
    tiles = getattr(im, "tile", None) or []
    if im.format != "PNG" or im.mode != "I;16" or not tiles or not all(
            t[0] == "zip" and t[3] == "I;16B" for t in tiles):
        return
    try:
        new = [t._replace(args="L;16B") for t in tiles]
    except (AttributeError, TypeError):  # another Pillow: decode the ordinary way
        return
    if hasattr(im, "_mode"):  # Pillow >= 10.1 keeps the mode here
        im._mode = "L"
        im.tile = new


def _refused_format(fp: Any) -> str:
    """' (looks like EPS)' when the first bytes name a format we refuse, else ''."""
    try:
        if isinstance(fp, io.BytesIO):
            head = fp.getvalue()[:16]
        else:
            with open(fp, "rb") as f:
                head = f.read(16)
    except OSError:
        return ""
    for magic, kind in _REFUSED_MAGIC:
        if head.lstrip()[:len(magic)] == magic:
            return f" (looks like {kind})"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypavif", b"ftypmif1"):
        return " (looks like HEIC/AVIF)"
    return ""


def _open_decoded(fp: Any, name: str, max_pixels: int, exif_transpose: bool,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    """Open (allowed formats only), check the declared size and raster bytes BEFORE decoding,
    decode fully, orient, convert to RGB."""
    try:
        # PIL itself warns above Image.MAX_IMAGE_PIXELS and raises at twice that; both caught
        # below (the warning only where warnings are errors). Our own limits are checked first.
        with Image.open(fp, formats=_OPEN_WITH) as im:
            if im.format not in FORMATS:  # a plugin may hand over to another format's class
                raise ImageError(f"image {name} is {im.format}, not an accepted format; pass a "
                                 "PNG, JPEG, WebP, BMP, GIF or TIFF file")
            _check_pixels(im.width, im.height, name, max_pixels)
            _decode_16bit_png_as_8bit(im)
            _check_bytes(im, name, max_bytes)
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
        raise ImageError(f"not an image or not an accepted format: {name}{_refused_format(fp)}; "
                         "pass a PNG, JPEG, WebP, BMP, GIF or TIFF file") from None
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
