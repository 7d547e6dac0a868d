"""The calibration / validation manifest: hashed (image, prompt, reference answer) items.

One item per line of a JSONL file (``calib_data/manifest.jsonl``), preceded by one header line::

    {"manifest": "qwenvl-edge-calib", "format_version": 1, "created_with": {"pillow": ..., ...}}
    {"id": "val-grounding-0000", "split": "validation", "task": "grounding",
     "image": {"generator": "grounding", "seed": 1000000000}, "prompt": "", "ref": "the red circle",
     "answer": "<ref>the red circle</ref><box>(95,110),(402,530)</box>",
     "truth": {"boxes": [{"ref": "the red circle", "box": [45, 50, 190, 240]}]},
     "sha256": "...", "size": [473, 452], "source": "...", "licence": "..."}

Images are never stored in the manifest: an item names a file (relative to the manifest), a
photograph inside the installed scikit-image wheel (``{"skimage": "astronaut"}``, read from the
package directory, never fetched), or a deterministic generator recipe
(``{"generator": "grounding" | "ocr", "seed": N}``, ``calib_data/synth.py``).

``sha256`` is the hash of the file's bytes for files and scikit-image photographs, and for
generated images the hash of their canonical pixels: ``b"qwenvl-edge-rgb8 {W}x{H}\\n"`` followed by
the raw RGB bytes. (Not of a PNG encoding: PNG bytes also depend on the zlib build, pixels only on
the rasteriser.) Pillow/FreeType render text slightly differently across versions, so the header
records the versions used, and a hash mismatch on a generated image says so.

Prompts are plain text. A grounding reference is the structured field ``ref`` (sent as
``<ref>...</ref>`` by the prompt builder), never special-token text inside ``prompt``: a prompt that
contains ``<ref>``, ``<img>`` or another special-token string is rejected. Reference answers are
model output and may contain ``<ref>``/``<box>`` tags. Ground-truth boxes are pixels of the
original image, ``[x1, y1, x2, y2]`` (x2/y2 exclusive).

User data: ``load_manifest`` also reads a user JSONL (``{"image": "photos/a.jpg", "prompt": "..."}``
per line, paths relative to the file, everything else optional) or a plain folder of images (each
gets the default caption prompt). Items without a split are split deterministically by hash
(``default_split="auto"``: every 4th image, in hash order, goes to validation), or all into
``default_split``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from runtime.errors import EdgeError
from runtime.files import atomic_write_bytes, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

FORMAT = "qwenvl-edge-calib"
FORMAT_VERSION = 1
TASKS = ("caption", "vqa", "grounding", "ocr")
SPLITS = ("calib", "validation")
SPLIT_ALIASES = {"calib": "calib", "calibration": "calib", "train": "calib",
                 "validation": "validation", "val": "validation", "valid": "validation"}
GENERATORS = ("grounding", "caption", "ocr")  # synth scenes: shapes (grounding/caption) or a sign
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DEFAULT_CAPTION_PROMPT = "Describe the image."
MAX_ERROR_LINES = 40  # a manifest gone stale as a whole is reported by its first lines
# Special-token strings that must never reach the prompt as text (the prompt builder would encode
# them as plain text anyway; rejecting them here catches manifests written for the raw format).
_SPECIAL_RE = re.compile(r"<\|?/?(img|imgpad|ref|box|quad|im_start|im_end|endoftext|extra_\d+)\|?>")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(EdgeError, ValueError):
    """A manifest that cannot be used; one line per bad entry, each saying what to do."""


# ---------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CalibItem:
    """One (image, prompt, reference answer) item of the calibration or validation split."""

    id: str
    image: dict[str, Any]  # {"file": rel} | {"generator": name, "seed": int} | {"skimage": name}
    prompt: str
    task: str = "caption"
    split: str = "validation"
    ref: str | None = None  # grounding referring expression, sent as <ref>...</ref>
    answer: str | None = None  # reference answer (model-output text, tags allowed)
    truth: dict[str, Any] = dataclasses.field(default_factory=dict)  # {"boxes": [...], "text": ...}
    sha256: str | None = None
    size: tuple[int, int] | None = None  # (W, H) of the original image, when known
    source: str | None = None
    licence: str | None = None
    base_dir: Path | None = dataclasses.field(default=None, repr=False, compare=False)
    rendered_with: dict[str, Any] | None = dataclasses.field(default=None, repr=False,
                                                             compare=False)  # header versions

    # -- derived ---------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        for k in ("file", "generator", "skimage"):
            if k in self.image:
                return k
        return "?"

    def describe_image(self) -> str:
        if self.kind == "file":
            return str(self.image["file"])
        if self.kind == "skimage":
            return f"skimage:{self.image['skimage']}"
        if self.kind == "generator":
            return f"{self.image['generator']}#{self.image.get('seed')}"
        return json.dumps(self.image)

    def query_parts(self) -> list[Any]:
        """The user turn after the picture as ``runtime.prompt`` parts: text, then ``Ref``."""
        from runtime.prompt import Ref

        parts: list[Any] = [self.prompt] if self.prompt else []
        if self.ref:
            parts.append(Ref(self.ref))
        return parts

    def truth_boxes(self) -> list[tuple[float, float, float, float]]:
        return [tuple(float(v) for v in b["box"]) for b in self.truth.get("boxes", [])]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "split": self.split, "task": self.task,
                             "image": dict(self.image), "prompt": self.prompt}
        for k in ("ref", "answer"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.truth:
            d["truth"] = self.truth
        for k in ("sha256", "source", "licence"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.size is not None:
            d["size"] = list(self.size)
        return d


# ---------------------------------------------------------------------------------------------
# Images: materialise and hash
# ---------------------------------------------------------------------------------------------

def pixel_sha256(img) -> str:
    """sha256 of an image's canonical pixels (RGB, 8 bit, row-major) with its size."""
    rgb = img.convert("RGB")
    h = hashlib.sha256(f"qwenvl-edge-rgb8 {rgb.width}x{rgb.height}\n".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


file_sha256 = sha256_file  # the name the manifest code and its callers use


def skimage_data_dir() -> Path:
    """The ``skimage/data`` directory of the installed wheel (its files are read directly, so
    nothing is ever downloaded through pooch)."""
    try:
        import skimage.data as skd
    except ImportError:
        raise ManifestError("this manifest uses scikit-image photographs: pip install "
                            "scikit-image (the qwenvl-edge[export] extra)") from None
    return Path(skd.__file__).parent


def skimage_file(name: str) -> Path:
    """The file of a scikit-image sample (``astronaut`` or ``astronaut.png``) in the wheel."""
    d = skimage_data_dir()
    if "/" in name or "\\" in name or name.startswith("."):
        raise ManifestError(f"skimage image name '{name}' must be a bare file name")
    if (d / name).is_file():
        return d / name
    for suf in (".png", ".jpg", ".jpeg", ".tif"):
        if (d / (name + suf)).is_file():
            return d / (name + suf)
    raise ManifestError(f"scikit-image sample '{name}' is not in the installed wheel ({d}); "
                        "it may need a download (not allowed) or another scikit-image version")


def _generate(image: dict[str, Any]):
    from . import synth

    gen, seed = image["generator"], int(image["seed"])
    if gen in ("grounding", "caption"):
        return synth.draw_grounding_scene(seed)[0]
    if gen == "ocr":
        return synth.draw_ocr_scene(seed)[0]
    raise ManifestError(f"unknown image generator '{gen}' (use {', '.join(GENERATORS)})")


def image_path(item: CalibItem) -> Path | None:
    """Where the item's image file is (None for generated images)."""
    if item.kind == "file":
        p = Path(item.image["file"])
        if not p.is_absolute() and item.base_dir is not None:
            p = item.base_dir / p
        return p
    if item.kind == "skimage":
        return skimage_file(str(item.image["skimage"]))
    return None


def image_hash(item: CalibItem, img=None) -> str:
    """The hash the manifest records for this item (file bytes, or canonical pixels)."""
    path = image_path(item)
    if path is not None:
        return file_sha256(path)
    return pixel_sha256(img if img is not None else _generate(item.image))


def materialise(item: CalibItem, cache_dir: str | Path | None = None, verify: bool = False):
    """The item's image as an RGB ``PIL.Image`` (loaded from its file, or generated).

    Generated images are cached as PNG under ``cache_dir`` (keyed by the recorded hash) when given.
    With ``verify`` the image's hash must equal the recorded one (``ManifestError`` otherwise).
    """
    from PIL import Image

    path = image_path(item)
    if path is not None:
        if not path.is_file():
            raise ManifestError(f"item '{item.id}': image {path} not found")
        if verify and item.sha256 and file_sha256(path) != item.sha256:
            raise ManifestError(_changed(item, path))
        with Image.open(path) as im:
            im.load()
            return _to_rgb(im)
    cached = None
    if cache_dir is not None and item.sha256:
        cached = Path(cache_dir) / f"{item.sha256}.png"
        if cached.is_file():
            with Image.open(cached) as im:
                im.load()
                img = im.convert("RGB")
            if not verify or pixel_sha256(img) == item.sha256:
                return img
    img = _generate(item.image).convert("RGB")
    if verify and item.sha256 and pixel_sha256(img) != item.sha256:
        raise ManifestError(_changed(item, None))
    if cached is not None:
        png = io.BytesIO()
        img.save(png, format="PNG")
        atomic_write_bytes(cached, png.getvalue())
    return img


def _to_rgb(im):
    """RGB view of any mode; transparent pixels composited on white, 1-bit/16-bit scaled."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np
        a = np.asarray(im, dtype=np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1) * 255
        return Image.fromarray(a.astype("uint8")).convert("RGB")
    return im.convert("RGB")


def _changed(item: CalibItem, path: Path | None) -> str:
    what = f"image {path}" if path is not None else f"generated image {item.describe_image()}"
    msg = (f"{what} (item '{item.id}') changed since the manifest was written: rebuild it "
           "(python -m calib_data.build --out <manifest>)")
    if path is None:
        rec = item.rendered_with
        now = render_versions()
        if rec and any(rec.get(k) != now.get(k) for k in ("pillow", "freetype")):
            msg += (f"; the manifest was rendered with Pillow {rec.get('pillow')} / FreeType "
                    f"{rec.get('freetype')}, this is Pillow {now['pillow']} / FreeType "
                    f"{now['freetype']}, whose rasteriser draws slightly different pixels")
    return msg


def render_versions() -> dict[str, str | None]:
    """Versions that determine generated pixels (recorded in the manifest header)."""
    import PIL
    from PIL import features

    out: dict[str, str | None] = {"pillow": PIL.__version__,
                                  "freetype": features.version("freetype2")}
    try:
        import skimage
        out["scikit-image"] = skimage.__version__
    except ImportError:  # pragma: no cover
        out["scikit-image"] = None
    try:
        import matplotlib  # the DejaVu fonts of the OCR signs ship in its wheel
        out["matplotlib"] = matplotlib.__version__
    except ImportError:  # pragma: no cover
        out["matplotlib"] = None
    return out


# ---------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------

_KNOWN_KEYS = {"id", "image", "prompt", "task", "split", "ref", "answer", "truth", "sha256",
               "size", "source", "licence", "license"}


def _parse_entry(d: Any, where: str, base: Path, default_split: str | None,
                 errors: list[str]) -> CalibItem | None:
    """One raw JSON entry -> item, appending one error line per problem."""
    n_err = len(errors)

    def bad(msg: str) -> None:
        errors.append(f"{where}: {msg}")

    if not isinstance(d, dict):
        bad(f"expected a JSON object, got {type(d).__name__}")
        return None
    unknown = sorted(set(d) - _KNOWN_KEYS)
    if unknown:
        bad(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_KNOWN_KEYS))})")
    image = _parse_image(d.get("image"), bad)
    task = d.get("task", "caption")
    if task not in TASKS:
        bad(f"unknown task '{task}' (use {', '.join(TASKS)})")
    prompt, ref = _parse_prompt(d, task, bad)
    raw_split = d.get("split", default_split)
    split = SPLIT_ALIASES.get(str(raw_split).lower()) if raw_split is not None else None
    if raw_split is not None and split is None:
        bad(f"bad split '{raw_split}' (use calib or validation)")
    answer = d.get("answer")
    if answer is not None and not isinstance(answer, str):
        bad("'answer' must be text")
    truth, size = _parse_truth(d, bad)
    if task == "ocr" and "text" not in truth and answer is None:
        log.debug("%s: OCR item without true text: only drift vs the reference is measured", where)
    sha = d.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA_RE.match(sha)):
        bad("'sha256' must be 64 lowercase hex digits")
    item_id = d.get("id")
    if item_id is not None and (not isinstance(item_id, str) or not item_id):
        bad("'id' must be a non-empty string")
    if len(errors) > n_err:
        return None
    if item_id is None:
        item_id = _default_id(image, prompt, ref)
    return CalibItem(id=item_id, image=image, prompt=prompt, task=task, split=split or "",
                     ref=ref, answer=answer, truth=truth, sha256=sha,
                     size=tuple(size) if size else None, source=d.get("source"),
                     licence=d.get("licence", d.get("license")), base_dir=base)


def _parse_image(image: Any, bad: Callable[[str], None]) -> dict[str, Any] | None:
    """The entry's image description as a dict (a bare path becomes ``{"file": path}``)."""
    if isinstance(image, str):
        image = {"file": image}
    kinds = ("file", "generator", "skimage")
    if not isinstance(image, dict) or sum(k in image for k in kinds) != 1:
        bad("'image' must be a path, {\"file\": path}, {\"skimage\": name} or "
            "{\"generator\": name, \"seed\": int}")
        image = None
    elif "generator" in image:
        if image["generator"] not in GENERATORS:
            bad(f"unknown image generator '{image['generator']}' (use {', '.join(GENERATORS)})")
        if not isinstance(image.get("seed"), int) or isinstance(image.get("seed"), bool):
            bad("a generated image needs an integer 'seed'")
    return image


def _parse_prompt(d: dict[str, Any], task: str, bad: Callable[[str], None]
                  ) -> tuple[str | None, Any]:
    """(prompt, ref): captions default their prompt, a grounding ref may stand in for one."""
    prompt = d.get("prompt", DEFAULT_CAPTION_PROMPT if task == "caption" else None)
    ref = d.get("ref")
    if prompt is None:
        prompt = "" if ref else None
    if not isinstance(prompt, str):
        bad("missing 'prompt' (text)")
        prompt = ""
    elif _SPECIAL_RE.search(prompt):
        bad(f"prompt contains special-token text '{_SPECIAL_RE.search(prompt).group(0)}': write "
            "grounding references as the field \"ref\": \"...\" (they are encoded as <ref> tags); "
            "other tags are not allowed in prompts")
    if ref is not None and (not isinstance(ref, str) or not ref.strip()):
        bad("'ref' must be non-empty text")
    if task == "grounding" and not ref and not (prompt or "").strip():
        bad("a grounding item needs a 'ref' (the referring expression) or a prompt")
    if not (prompt or "").strip() and not ref:
        bad("empty prompt")
    return prompt, ref


def _parse_truth(d: dict[str, Any], bad: Callable[[str], None]) -> tuple[dict[str, Any], Any]:
    """(truth, size): the ground truth, its boxes checked against the image size when given."""
    truth = d.get("truth") or {}
    size = d.get("size")
    if size is not None and not (isinstance(size, list) and len(size) == 2
                                 and all(isinstance(v, int) and v > 0 for v in size)):
        bad("'size' must be [width, height] in pixels")
        size = None
    if not isinstance(truth, dict):
        bad("'truth' must be an object ({\"boxes\": [...], \"text\": ...})")
        truth = {}
    for j, b in enumerate(truth.get("boxes", []) or []):
        box = b.get("box") if isinstance(b, dict) else None
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            bad(f"truth box {j} must be {{\"ref\": text, \"box\": [x1, y1, x2, y2]}} in pixels")
        elif not (box[0] < box[2] and box[1] < box[3] and min(box) >= 0):
            bad(f"truth box {j} {box} is empty or negative (x1 < x2, y1 < y2, pixels >= 0)")
        elif size is not None and (box[2] > size[0] or box[3] > size[1]):
            bad(f"truth box {j} {box} lies outside the {size[0]}x{size[1]} image")
    if "text" in truth and not isinstance(truth["text"], str):
        bad("truth 'text' must be a string")
    return truth, size


def _default_id(image: dict[str, Any], prompt: str, ref: str | None) -> str:
    key = json.dumps([image, prompt, ref], sort_keys=True)
    stem = Path(str(image.get("file", image.get("skimage", image.get("generator", "img"))))).stem
    return f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


class CalibSet(list):
    """A list of ``CalibItem`` plus the manifest header (``meta``) and its path."""

    def __init__(self, items: Iterable[CalibItem] = (), meta: dict[str, Any] | None = None,
                 path: Path | None = None):
        super().__init__(items)
        self.meta = dict(meta or {})
        self.path = path

    def split(self, name: str) -> "CalibSet":
        name = SPLIT_ALIASES.get(name, name)
        return CalibSet((i for i in self if i.split == name), self.meta, self.path)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for it in self:
            out.setdefault(it.split, {}).setdefault(it.task, 0)
            out[it.split][it.task] += 1
        return out


def _read_entries(path: Path) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """(header, [(where, raw entry)]) of a JSONL or JSON manifest."""
    text = path.read_text(encoding="utf-8")
    header: dict[str, Any] = {}
    entries: list[tuple[str, Any]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            header = {k: v for k, v in data.items() if k != "items"}
            data = data.get("items")
        if not isinstance(data, list):
            raise ManifestError(f"{path}: expected a list of items or {{\"items\": [...]}}")
        entries = [(f"{path.name} item {i}", d) for i, d in enumerate(data)]
    else:
        errors = []
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("//"):
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{path.name}:{ln}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            if isinstance(d, dict) and d.get("manifest") == FORMAT:
                header = d
                continue
            entries.append((f"{path.name}:{ln}", d))
        if errors:
            raise ManifestError(f"{len(errors)} bad line(s) in {path}:\n" + "\n".join(errors))
    if header:
        v = header.get("format_version")
        if v is not None and int(v) > FORMAT_VERSION:
            raise ManifestError(f"{path}: format version {v} is newer than this toolkit reads "
                                f"({FORMAT_VERSION}); upgrade qwenvl-edge")
    return header, entries


def _folder_entries(folder: Path) -> list[tuple[str, Any]]:
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ManifestError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return [(str(p.relative_to(folder)), {"id": str(p.relative_to(folder).with_suffix("")),
                                          "image": {"file": str(p.relative_to(folder))},
                                          "task": "caption", "prompt": DEFAULT_CAPTION_PROMPT,
                                          "source": "user folder"})
            for p in files]


def load_manifest(path: str | Path, verify: bool | str = True,
                  default_split: str | None = "auto") -> CalibSet:
    """Read and check a manifest: JSONL, JSON, or a folder of images.

    ``verify``: ``True``/``"hash"`` checks every image exists and matches its recorded sha256
    (computing it for entries that have none); ``"exists"`` only that files exist; ``False``
    nothing beyond the entries' syntax. ``default_split`` for entries without a split: ``"auto"``
    (deterministic by hash), ``"calib"`` or ``"validation"``.

    Raises ``ManifestError`` listing every bad entry, one per line (missing image, unknown task,
    bad split, duplicate id, hash mismatch, ...), and when the two splits share an image.
    """
    path = Path(path)
    header, entries, base = _manifest_entries(path, default_split)
    fixed_split = None if default_split in (None, "auto") else default_split
    errors: list[str] = []
    items: list[CalibItem] = []
    seen: dict[str, str] = {}
    for where, d in entries:
        it = _parse_entry(d, where, base, fixed_split, errors)
        if it is None:
            continue
        if it.id in seen:
            errors.append(f"{where}: duplicate id '{it.id}' (first at {seen[it.id]})")
            continue
        seen[it.id] = where
        items.append(it)
    _note_render_versions(path, header, items)
    if verify:
        _verify_images(items, seen, verify, errors)
    if errors:
        shown = errors if len(errors) <= MAX_ERROR_LINES else \
            errors[:MAX_ERROR_LINES] + [f"... and {len(errors) - MAX_ERROR_LINES} more"]
        raise ManifestError(f"{len(errors)} bad entr{'y' if len(errors) == 1 else 'ies'} in "
                            f"{path}:\n" + "\n".join(shown))
    if any(not it.split for it in items):
        _auto_split(items)
    check_disjoint(items)
    return CalibSet(items, header, path)


def _manifest_entries(path: Path, default_split: str | None
                      ) -> tuple[dict[str, Any], list[tuple[str, Any]], Path]:
    """(header, raw entries, base dir for relative images) of a manifest file or image folder."""
    if not path.exists():
        raise ManifestError(f"manifest {path} not found (build one with python -m "
                            "calib_data.build, or pass a folder of images or a JSONL of "
                            "{\"image\", \"prompt\"} lines)")
    if default_split not in (None, "auto") and default_split not in SPLIT_ALIASES:
        raise ManifestError(f"default_split '{default_split}': use auto, calib or validation")
    if path.is_dir():
        header, entries, base = {}, _folder_entries(path), path
    else:
        header, entries = _read_entries(path)
        base = path.parent
    if not entries:
        raise ManifestError(f"{path}: no items")
    return header, entries, base


def _note_render_versions(path: Path, header: dict[str, Any], items: list[CalibItem]) -> None:
    """Record the header's render versions on the items; warn when generated pixels may differ."""
    versions = header.get("created_with", {})
    if any(it.kind == "generator" for it in items) and versions:
        now = render_versions()
        diff = [k for k in ("pillow", "freetype") if versions.get(k) and versions.get(k) != now[k]]
        if diff:
            log.warning("%s was rendered with %s; this environment has %s: generated images may "
                        "differ slightly, a hash mismatch then means rebuild the manifest", path,
                        ", ".join(f"{k} {versions.get(k)}" for k in diff),
                        ", ".join(f"{k} {now[k]}" for k in diff))
        for it in items:
            it.rendered_with = versions


def _verify_images(items: list[CalibItem], seen: dict[str, str], verify: bool | str,
                   errors: list[str]) -> None:
    """Check each image exists (and, unless ``verify == "exists"``, its sha256), filling in
    missing hashes; appends one error line per bad item."""
    for it in items:
        where = seen[it.id]
        try:
            p = image_path(it)
            if p is not None and not p.is_file():
                errors.append(f"{where}: image {p} not found (item '{it.id}')")
                continue
            if verify == "exists":
                continue
            actual = image_hash(it)
            if it.sha256 is None:
                it.sha256 = actual
            elif actual != it.sha256:
                errors.append(f"{where}: " + _changed(it, p))
        except ManifestError as e:
            errors.append(f"{where}: {e}")
        except OSError as e:
            errors.append(f"{where}: cannot read image of item '{it.id}': {e}")


def _auto_split(items: list[CalibItem]) -> None:
    """Every 4th distinct image (in hash order) to validation, the rest to calib; an image's items
    stay together. Items without a hash are keyed by their image description."""
    unsplit = [it for it in items if not it.split]
    keys = sorted({it.sha256 or hashlib.sha256(it.describe_image().encode()).hexdigest()
                   for it in unsplit})
    taken = {it.sha256 for it in items if it.split and it.sha256}
    val = {k for j, k in enumerate(keys) if j % 4 == 0 and k not in taken}
    if len(keys) == 1:
        val = set(keys)
    for it in unsplit:
        k = it.sha256 or hashlib.sha256(it.describe_image().encode()).hexdigest()
        it.split = "validation" if k in val else "calib"


def check_disjoint(items: Sequence[CalibItem]) -> None:
    """Raise ``ManifestError`` if an image (by sha256) appears in both splits."""
    by_hash: dict[str, dict[str, list[str]]] = {}
    for it in items:
        if it.sha256 is None:
            continue
        by_hash.setdefault(it.sha256, {}).setdefault(it.split, []).append(it.id)
    shared = {h: s for h, s in by_hash.items() if len(s) > 1}
    if shared:
        lines = [f"image {h[:12]}… is in both splits: " +
                 "; ".join(f"{sp}: {', '.join(ids)}" for sp, ids in sorted(s.items()))
                 for h, s in shared.items()]
        raise ManifestError(f"calibration and validation splits share {len(shared)} image(s) "
                            "(never validate on calibration images); move or drop them:\n"
                            + "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def manifest_header(items: Sequence[CalibItem], **extra: Any) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    for it in items:
        counts.setdefault(it.split, {}).setdefault(it.task, 0)
        counts[it.split][it.task] += 1
    return {"manifest": FORMAT, "format_version": FORMAT_VERSION,
            "hash": "sha256 of file bytes (file, skimage) or of canonical RGB pixels (generator)",
            "created_with": render_versions(), "counts": counts, **extra}


def write_manifest(path: str | Path, items: Sequence[CalibItem], **header: Any) -> Path:
    """Write a JSONL manifest atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    ids = [it.id for it in items]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ManifestError(f"duplicate item id(s): {', '.join(dup)}")
    check_disjoint(items)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    buf.write(json.dumps(manifest_header(items, **header), ensure_ascii=False) + "\n")
    for it in items:
        buf.write(json.dumps(it.to_dict(), ensure_ascii=False) + "\n")
    return atomic_write_text(path, buf.getvalue())
