"""runtime.image: exact preprocessing, robust loading (EXIF, modes, corrupt files, bombs)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from runtime.image import (MEAN, STD, ImageError, load_image, preprocess, preprocess_batch,
                           to_rgb)


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    ch = len(mode)
    a = rng.integers(0, 256, size=(h, w, ch) if ch > 1 else (h, w), dtype=np.uint8)
    return Image.fromarray(a, mode)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# -- preprocessing ----------------------------------------------------------------------------

@pytest.mark.parametrize("size,wh", [(448, (300, 200)), (64, (50, 90)), (32, (32, 32))])
def test_preprocess_equals_torchvision_math(size, wh):
    torch = pytest.importorskip("torch")
    img = _noise(*wh)
    ours = preprocess(img, size)
    x = torch.from_numpy(np.asarray(img.resize((size, size), Image.BICUBIC)).copy())
    x = x.permute(2, 0, 1).float().div(255)  # torchvision ToTensor
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    ref = ((x - mean) / std).numpy()  # torchvision Normalize
    assert ours.dtype == np.float32 and ours.shape == (3, size, size)
    assert ours.flags.c_contiguous
    assert np.array_equal(ours, ref)


def test_preprocess_squashes_without_crop():
    # left half black, right half white on a wide image: after the squash the split is central
    a = np.zeros((40, 400, 3), np.uint8)
    a[:, 200:] = 255
    px = preprocess(a, 64)
    white = (1.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    assert np.allclose(px[:, :, 40:], white[:, None, None])
    assert np.allclose(px[:, :, :24], (-np.asarray(MEAN) / np.asarray(STD))[:, None, None])


def test_preprocess_inputs_agree(tmp_path):
    img = _noise(60, 40)
    p = tmp_path / "x.png"
    img.save(p)
    ref = preprocess(img, 64)
    assert np.array_equal(preprocess(np.asarray(img), 64), ref)
    assert np.array_equal(preprocess(str(p), 64), ref)
    assert np.array_equal(preprocess(p.read_bytes(), 64), ref)
    assert np.array_equal(preprocess(img.convert("RGBA"), 64), ref)


def test_preprocess_batch():
    imgs = [_noise(30, 20, seed=1), _noise(20, 30, seed=2)]
    b = preprocess_batch(imgs, 32)
    assert b.shape == (2, 3, 32, 32) and b.dtype == np.float32
    assert np.array_equal(b[1], preprocess(imgs[1], 32))
    assert preprocess_batch([], 32).shape == (0, 3, 32, 32)
    with pytest.raises(ImageError, match="image_size"):
        preprocess(imgs[0], 0)


# -- modes ------------------------------------------------------------------------------------

def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    p = tmp_path / "rot.jpg"
    img.save(p, "JPEG", exif=exif.tobytes())
    assert Image.open(p).size == (40, 20)
    assert load_image(p).size == (20, 40)
    assert load_image(p.read_bytes()).size == (20, 40)
    assert load_image(p, exif_transpose=False).size == (40, 20)
    with Image.open(p) as im:
        im.load()
        assert load_image(im).size == (20, 40)


def test_rgba_and_palette_drop_alpha_like_pil_convert():
    rgba = _noise(16, 8, "RGBA")
    out = load_image(rgba)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(rgba.convert("RGB")))
    pal = _noise(16, 8).convert("P")
    pal.info["transparency"] = 0
    out = load_image(_png_bytes(pal))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(pal.convert("RGB")))
    la = _noise(8, 8, "LA")
    assert np.array_equal(np.asarray(load_image(la))[..., 0], np.asarray(la)[..., 0])


def test_greyscale_and_cmyk():
    grey = _noise(10, 6, "L")
    out = np.asarray(load_image(grey))
    assert out.shape == (6, 10, 3)
    assert all(np.array_equal(out[..., c], np.asarray(grey)) for c in range(3))
    cmyk = Image.new("CMYK", (5, 5), (0, 255, 255, 0))  # pure red in CMYK
    assert load_image(cmyk).getpixel((2, 2)) == (255, 0, 0)
    arr = np.asarray(grey)
    assert np.array_equal(np.asarray(load_image(arr)), out)
    assert np.array_equal(np.asarray(load_image(arr[..., None])), out)


def test_16bit_greyscale_scaled_not_clipped(tmp_path):
    ramp = np.array([[0, 255, 256, 4660, 32768, 65280, 65535]], dtype=np.uint16)
    want = (ramp >> 8).astype(np.uint8)
    img16 = Image.fromarray(ramp)
    assert img16.mode.startswith("I;16")
    p = tmp_path / "ramp16.png"
    img16.save(p)
    for src in (img16, p, p.read_bytes(), img16.convert("I")):
        out = np.asarray(load_image(src))
        assert out.dtype == np.uint8 and np.array_equal(out[..., 0], want), src
        assert np.array_equal(out[..., 1], want) and np.array_equal(out[..., 2], want)
    assert to_rgb(img16).mode == "RGB"


# -- failures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    buf = io.BytesIO()
    _noise(64, 64).save(buf, fmt)
    data = buf.getvalue()
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated") as e:
        load_image(p)
    assert str(p) in _one_line(e)
    with pytest.raises(ImageError):
        load_image(data[: len(data) // 2])


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not an image") as e:
        load_image(p)
    assert str(p) in _one_line(e)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_missing_path_directory_url(tmp_path):
    with pytest.raises(ImageError, match="not found") as e:
        load_image(tmp_path / "missing.jpg")
    assert "missing.jpg" in _one_line(e)
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="URLs are never opened"):
        load_image("https://example.com/cat.jpg")
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(12345)  # type: ignore[arg-type]


def _png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG that declares w x h pixels (IHDR) but holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("wh", [(8000, 8000), (100_000, 100_000)])
def test_decompression_bomb(tmp_path, wh):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(*wh))
    assert p.stat().st_size < 200
    with pytest.raises(ImageError, match="max_pixels|too large") as e:
        load_image(p)
    assert "bomb.png" in _one_line(e)


def test_max_pixels_limit(tmp_path):
    p = tmp_path / "small.png"
    _noise(20, 20).save(p)
    with pytest.raises(ImageError, match="max_pixels=100"):
        load_image(p, max_pixels=100)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(_noise(20, 20), max_pixels=100)
    assert load_image(p, max_pixels=400).size == (20, 20)


def test_bad_arrays():
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((5, 5, 3), np.float32))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((5, 5, 2), np.uint8))
