"""Images: only allow-listed formats are decoded, recognised by content, and the work per image
is bounded by its decoded bytes (issue 18, item 3)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from runtime.image import ImageError, load_image, preprocess

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def _noise(w: int = 40, h: int = 30, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _encoded(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    _noise(mode=mode).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def no_ghostscript(monkeypatch):
    """The EPS plugin must never see the bytes (it runs Ghostscript on them)."""
    def boom(*a, **k):
        raise AssertionError("the EPS plugin was asked to open untrusted bytes")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", boom)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", boom)


@pytest.mark.parametrize("name", ["drawing.eps", "photo.png", "photo.jpg"])
def test_eps_never_reaches_the_eps_plugin(tmp_path, no_ghostscript, name):
    p = tmp_path / name
    p.write_bytes(EPS)
    for src in (p, EPS):
        with pytest.raises(ImageError, match=r"not an accepted format.*looks like PostScript/EPS"
                                             r".*PNG, JPEG, WebP, BMP, GIF or TIFF") as e:
            load_image(src)
        assert "\n" not in str(e.value) and "corrupt" not in str(e.value)


@pytest.mark.parametrize("fmt,mode", [("ICO", "RGB"), ("PCX", "RGB"), ("PPM", "RGB"),
                                      ("SGI", "RGB"), ("TGA", "RGB"),
                                      ("DDS", "RGB"), ("XBM", "1"), ("PSD", None)])
def test_other_pillow_formats_are_refused_by_content(tmp_path, fmt, mode):
    if fmt == "PSD":  # Pillow cannot write PSD: a minimal 8BPS header is enough to be refused
        data = b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03" + b"\x00\x00\x00\x10" * 2 + b"\x00\x08\x00\x03"
    else:
        data = _encoded(fmt, mode)
    p = tmp_path / "looks-fine.png"  # the extension does not matter
    p.write_bytes(data)
    with pytest.raises(ImageError, match="not an accepted format"):
        load_image(p)
    with pytest.raises(ImageError, match="not an accepted format"):
        load_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF"])
def test_allowed_formats_decode_like_pil_convert(tmp_path, fmt):
    data = _encoded(fmt)
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    p = tmp_path / "image.bin"  # no extension needed either
    p.write_bytes(data)
    for src in (p, data):
        got = load_image(src)
        assert got.size == (40, 30) and np.array_equal(np.asarray(got), want)
        assert np.array_equal(preprocess(src, 32), preprocess(Image.fromarray(want), 32))
    from runtime.image import FORMATS

    assert Image.open(io.BytesIO(data)).format in FORMATS


def test_work_per_image_is_bounded_by_decoded_bytes(tmp_path):
    big = np.zeros((2000, 2000), np.uint16)  # 4 MP, 8 MB as 16-bit, a few KB compressed
    tif = tmp_path / "big16.tif"
    Image.fromarray(big).save(tif, compression="tiff_deflate")
    assert tif.stat().st_size < 100_000
    with pytest.raises(ImageError, match=r"2000x2000 I;16 = 8 MB decoded, more than max_bytes=5 MB"):
        load_image(tif, max_bytes=5_000_000)
    rgba = tmp_path / "big.png"
    Image.new("RGBA", (2000, 2000)).save(rgba)
    with pytest.raises(ImageError, match="16 MB decoded"):
        load_image(rgba, max_bytes=10_000_000)
    assert load_image(rgba, max_bytes=16_000_000).size == (2000, 2000)


def test_16bit_png_decodes_straight_to_8bit(tmp_path):
    # a 16-bit greyscale PNG costs what an 8-bit one does: 1 byte per pixel while decoding
    ramp = (np.arange(300 * 200, dtype=np.uint32) * 977 % 65536).astype(np.uint16)
    ramp = ramp.reshape(200, 300)
    p = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(p)
    out = load_image(p, max_bytes=300 * 200)  # would need 2 bytes per pixel as I;16
    want = (ramp >> 8).astype(np.uint8)
    a = np.asarray(out)
    assert out.mode == "RGB" and all(np.array_equal(a[..., c], want) for c in range(3))
    assert np.array_equal(a, np.asarray(load_image(Image.open(p))))  # the slow path agrees
