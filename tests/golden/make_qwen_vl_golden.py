"""Produce ``tests/golden/qwen_vl_orig_nano.npz``: outputs of the ORIGINAL Qwen-VL-Chat remote code
(``modeling_qwen.py``, ``visual.py``, ``tokenization_qwen.py``, ``configuration_qwen.py``,
``qwen_generation_utils.py``) on a nano checkpoint made by ``models.nano.make_nano_checkpoint``.

This script contains none of the original code: pass a directory holding the five original files.
It needs an environment with ``transformers`` (4.37.2 was used), ``tiktoken``, ``einops``,
``pillow``, ``matplotlib`` (imported by tokenization_qwen.py) and, where the real packages are
missing, the shims below (``torchvision``, ``transformers_stream_generator``), which it installs
itself on ``sys.path`` when those packages do not import. Run it from the repository root, e.g.::

    HF_HOME=<hf-home> HF_HUB_OFFLINE=1 \\
        <venv>/bin/python tests/golden/make_qwen_vl_golden.py --orig-dir <orig>

Everything runs in fp32 on CPU. ``tests/test_reference_vs_original.py`` then checks our model
against the stored arrays without needing the original code or transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.nano import NanoSpec, make_nano_checkpoint  # noqa: E402
from runtime.files import sha256_file  # noqa: E402

ORIG_FILES = ("modeling_qwen.py", "visual.py", "tokenization_qwen.py", "configuration_qwen.py",
              "qwen_generation_utils.py")

# The golden nano model. The original code constrains it: n_queries must stay 256 (the tokenizer
# hard-codes a 256-slot image span), hidden_size a multiple of 128 (the resampler has
# hidden/128 heads). image 64 / patch 2 keeps the real 32x32 patch grid (so both 256-row position
# tables are bicubically upsampled 16x16 -> 32x32 exactly as in the real 448/14 model) while the
# stored pixel tensor stays small. vis_mlp_ratio is the real 4.9231 (int() truncation exercised).
GOLDEN_SPEC = NanoSpec(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                       vis_width=64, vis_layers=2, vis_heads=4, vis_mlp_ratio=4.9231,
                       image_size=64, patch_size=2, n_queries=256, n_merges=512, seq_length=2048)
GOLDEN_SEED = 0
GOLDEN_DTYPE = "fp32"
SYSTEM = "You are a helpful assistant."
QUESTION = "What is it?"
IMAGE_NAME = "img.png"
N_DECODE = 5
N_GREEDY = 10
N_LAST = 8
# The golden checkpoint's resampler position table, frozen: it was computed with the original
# float32 formula (whose last bits depend on numpy's AVX-512 dispatch), while models/nano.py now
# computes it in float64 (the same bytes on every CPU). Passing the frozen table keeps the
# checkpoint byte-identical to the one the original code ran on, on any CPU.
FROZEN = {"transformer.visual.attn_pool.pos_embed": "attn_pool_pos_embed_256x128.npy"}


def frozen_tensors() -> dict[str, torch.Tensor]:
    """The stored tensors that replace generated ones in the golden checkpoint."""
    here = Path(__file__).parent
    return {name: torch.from_numpy(np.load(here / f)) for name, f in FROZEN.items()}


# Shims, used only where the real package cannot be imported (PyPI's torchvision does not import
# beside a torch build it was not made for; transformers_stream_generator is needed only by
# chat_stream(), never called here, but transformers' check_imports() insists on the name).
_TORCHVISION_TRANSFORMS = '''\
"""Shim: exact equivalents of torchvision.transforms' PIL path (the only one visual.py uses).

torchvision on a PIL image:
  Resize((h, w), BICUBIC)  -> F_pil.resize -> img.resize((w, h), PIL.Image.BICUBIC)
  ToTensor()               -> torch.from_numpy(np.array(img)).view(h, w, c).permute(2, 0, 1)
                              .contiguous().to(torch.get_default_dtype()).div(255)
  Normalize(mean, std)     -> mean/std as tensors of the input dtype viewed [C,1,1];
                              tensor.clone().sub_(mean).div_(std)
"""
import enum

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.BILINEAR: Image.BILINEAR,
        InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.BOX: Image.BOX,
        InterpolationMode.HAMMING: Image.HAMMING, InterpolationMode.LANCZOS: Image.LANCZOS}


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, max_size=None,
                 antialias=True):
        if not (isinstance(size, (tuple, list)) and len(size) == 2):
            raise NotImplementedError("shim supports only an explicit (h, w) size")
        self.size = (int(size[0]), int(size[1]))
        self.interpolation = interpolation

    def __call__(self, img):
        if not isinstance(img, Image.Image):
            raise NotImplementedError("shim supports only PIL input")
        h, w = self.size
        return img.resize((w, h), _PIL[self.interpolation])


class ToTensor:
    def __call__(self, pic):
        if not isinstance(pic, Image.Image) or pic.mode != "RGB":
            raise NotImplementedError("shim supports only RGB PIL input")
        img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
        img = img.view(pic.size[1], pic.size[0], 3).permute((2, 0, 1)).contiguous()
        return img.to(dtype=torch.get_default_dtype()).div(255)


class Normalize:
    def __init__(self, mean, std, inplace=False):
        self.mean, self.std = mean, std

    def __call__(self, tensor):
        tensor = tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)
'''

SHIMS = {
    "torchvision/__init__.py": '__version__ = "shim"\nfrom . import transforms  # noqa: F401\n',
    "torchvision/transforms/__init__.py": _TORCHVISION_TRANSFORMS,
    "transformers_stream_generator/__init__.py": '"""Shim: only chat_stream() imports it."""\n',
    "transformers_stream_generator/main.py":
        'raise ImportError("shim: chat_stream() unsupported")\n',
}


def install_shims(where: Path) -> list[str]:
    """Write the shims for the packages that do not import; put them first on sys.path."""
    import importlib.util

    used = []
    for pkg in ("torchvision", "transformers_stream_generator"):
        try:
            ok = importlib.util.find_spec(pkg) is not None
            if ok and pkg == "torchvision":
                import torchvision.transforms  # noqa: F401  (fails when built for another torch)
        except Exception:
            ok = False
            for name in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
                del sys.modules[name]
        if ok:
            continue
        for rel, text in SHIMS.items():
            if rel.startswith(pkg + "/"):
                (where / rel).parent.mkdir(parents=True, exist_ok=True)
                (where / rel).write_text(text)
        used.append(pkg)
    if used:
        sys.path.insert(0, str(where))
    return used


def shard_digests(ckpt: Path) -> dict[str, str]:
    return {p.name: sha256_file(p)
            for p in sorted(ckpt.glob("*.safetensors"))}


def tensor_digest(ckpt: Path) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, sorted by name.

    Independent of the safetensors file layout, so a serializer change can be told apart from a
    change of the weights themselves.
    """
    from safetensors import safe_open

    h = hashlib.sha256()
    tensors = {}
    for p in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def make_image(seed: int, width: int = 90, height: int = 70) -> np.ndarray:
    """A deterministic RGB test picture (gradients + shapes + noise), not square on purpose."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 127 + 120 * np.sin(x / 9.0) * np.cos(y / 13.0)
    g = 255 * x / (width - 1)
    b = 255 * ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 3) ** 2)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def run_original(orig_dir: Path, spec: NanoSpec, seed: int, dtype: str, work: Path) -> dict:
    import transformers
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fixed = frozen_tensors() if spec == GOLDEN_SPEC else None  # another spec: fresh tables
    ckpt = make_nano_checkpoint(work / "ckpt", seed=seed, spec=spec, dtype=dtype, fixed=fixed)
    hf_dir = work / "hf"
    shutil.copytree(ckpt, hf_dir)
    for f in ORIG_FILES:
        shutil.copy(orig_dir / f, hf_dir / f)

    rgb = make_image(seed)
    img_dir = work / "cwd"
    img_dir.mkdir()
    Image.fromarray(rgb, "RGB").save(img_dir / IMAGE_NAME)

    tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), trust_remote_code=True, fp32=True, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise SystemExit(f"original code did not load the nano checkpoint cleanly: {bad}")
    model.eval()
    # The loaded parameters must be the checkpoint's values bit for bit.
    from safetensors.torch import load_file
    disk = {}
    for p in ckpt.glob("*.safetensors"):
        disk.update(load_file(str(p)))
    sd = model.state_dict()
    for k, v in disk.items():
        if not torch.equal(sd[k], v.float()):
            raise SystemExit(f"original model's {k} differs from the checkpoint")

    gen_utils = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".qwen_generation_utils"]
    query = tok.from_list_format([{"image": IMAGE_NAME}, {"text": QUESTION}])
    cwd = os.getcwd()
    os.chdir(img_dir)  # the original opens the image path named inside input_ids, relative to cwd
    try:
        raw_text, context = gen_utils.make_context(tok, query, history=None, system=SYSTEM,
                                                   max_window_size=6144, chat_format="chatml")
        ids = torch.tensor([context])
        vis = model.transformer.visual
        with torch.no_grad():
            pixels = vis.image_transform(Image.open(IMAGE_NAME).convert("RGB")).unsqueeze(0)
            features = vis.encode([IMAGE_NAME])
            features_from_pixels = vis(pixels)
            assert torch.equal(features, features_from_pixels)

            out = model(ids, use_cache=True)
            prefill = out.logits[0]
            past = out.past_key_values
            dec_tokens, dec_logits = [], []
            nxt = int(prefill[-1].argmax())
            for step in range(N_DECODE):
                dec_tokens.append(nxt)
                mask = torch.ones(1, ids.size(1) + step + 1, dtype=torch.long)
                o = model(torch.tensor([[nxt]]), past_key_values=past, attention_mask=mask,
                          use_cache=True)
                past = o.past_key_values
                dec_logits.append(o.logits[0, -1])
                nxt = int(o.logits[0, -1].argmax())

            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 num_beams=1, top_p=None, top_k=None, max_new_tokens=N_GREEDY)
    finally:
        os.chdir(cwd)
    greedy = gen[0, ids.size(1):].tolist()

    start = tok.img_start_id
    a = context.index(start)
    b = context.index(tok.img_end_id)
    ids_pad = list(context)
    ids_pad[a + 1:b] = [tok.img_pad_id] * (b - a - 1)

    meta = {
        "spec": dataclasses.asdict(spec), "seed": seed, "dtype": dtype,
        "shard_sha256": shard_digests(ckpt), "tensor_sha256": tensor_digest(ckpt),
        "system": SYSTEM, "query": query, "raw_text": raw_text, "image_name": IMAGE_NAME,
        "img_start": a, "img_end": b, "eod_id": tok.eod_id, "im_start_id": tok.im_start_id,
        "im_end_id": tok.im_end_id, "img_start_id": tok.img_start_id,
        "img_pad_id": tok.img_pad_id, "n_vocab": len(tok),
        "transformers": transformers.__version__, "torch": torch.__version__,
        "orig_sha256": {f: sha256_file(orig_dir / f)
                        for f in ORIG_FILES},
        "torchvision": getattr(sys.modules.get("torchvision"), "__version__", None),
    }
    return {
        "meta": np.array(json.dumps(meta, sort_keys=True)),
        "image_rgb": rgb,
        "input_ids": np.array(context, dtype=np.int64),
        "input_ids_imgpad": np.array(ids_pad, dtype=np.int64),
        "pixels": pixels.numpy().astype(np.float32),
        "features": features[0].numpy().astype(np.float32),
        "prefill_logits": prefill.numpy().astype(np.float32),
        "decode_tokens": np.array(dec_tokens, dtype=np.int64),
        "decode_logits": torch.stack(dec_logits).numpy().astype(np.float32),
        "greedy_ids": np.array(greedy, dtype=np.int64),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orig-dir", required=True, type=Path,
                    help="directory holding the five original Qwen-VL-Chat .py files")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("qwen_vl_orig_nano.npz"))
    ap.add_argument("--spec", type=json.loads, default=None,
                    help="JSON NanoSpec overrides (default: the committed golden spec)")
    ap.add_argument("--seed", type=int, default=GOLDEN_SEED)
    ap.add_argument("--dtype", default=GOLDEN_DTYPE, help="on-disk dtype (loaded as fp32)")
    ap.add_argument("--source", default="",
                    help="where the original files came from (repo@commit), recorded in the npz")
    ap.add_argument("--full", action="store_true",
                    help="keep the prefill logits of every position (default: the last 8)")
    args = ap.parse_args(argv)
    missing = [f for f in ORIG_FILES if not (args.orig_dir / f).is_file()]
    if missing:
        raise SystemExit(f"{args.orig_dir} lacks {', '.join(missing)}")
    spec = dataclasses.replace(GOLDEN_SPEC, **(args.spec or {}))
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        shims = install_shims(Path(tmp) / "shims")
        arrays = run_original(args.orig_dir.resolve(), spec, args.seed, args.dtype, Path(tmp))
    meta = json.loads(str(arrays["meta"]))
    meta["shims"] = shims
    meta["source"] = args.source
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    if not args.full:
        arrays["prefill_logits"] = arrays["prefill_logits"][-N_LAST:]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes); "
          f"greedy {arrays['greedy_ids'].tolist()}; shards {meta['shard_sha256']}")


if __name__ == "__main__":
    main()
