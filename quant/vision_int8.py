"""int8 vision engine: static post-training quantization (QDQ) of the exported vision ONNX.

The fp32 ``vision.onnx`` (exporters/vision.py) goes through ``onnxruntime.quantization``'s
``quantize_static`` in the QDQ form: QuantizeLinear / DequantizeLinear pairs around the
convolution and the matmuls, which TensorRT builds as int8 kernels on Jetson Orin and
onnxruntime fuses into int8 kernels on CPU. Both activations and weights are *symmetric* int8
(zero point 0), the only activation form TensorRT accepts. The engine contract is unchanged:
``pixel_values`` float32 ``[N, 3, S, S]`` in, ``image_embeds`` float32 ``[N, q, d]`` out.

Calibration reads the **calibration split** of the manifest only (never the validation split,
which the drift report judges on): one preprocessed image per distinct picture, exactly as the
runtime preprocesses it. LayerNorm and softmax are never quantized (they are not in
``op_types``); further layers stay float by *label* (``exclude``), where a label is the module
the exporter recorded for the node (``blocks.3.c_fc``; ``blocks.3.attn_qk`` and
``blocks.3.attn_v`` for the two activation-by-activation matmuls of a block's attention, the
scores ``q k^T`` and ``softmax(.) v``; ``resampler.attn_qk`` / ``resampler.attn_v`` for the
resampler's; ``conv1`` for the patch embedding; ``proj`` for the output projection). Which
layers to exclude and which calibration method to use are measured by
``python -m bench.vision_int8`` (bench/RESULTS.md).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fnmatch
import gc
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import EdgeError

log = logging.getLogger(__name__)

PIXELS = "pixel_values"  # the engine contract (exporters/vision.py); quant does not import it
EMBEDS = "image_embeds"
META_PREFIX = "qwenvl_edge."
CALIB_SPLIT = "calib"
METHODS = ("minmax", "entropy", "percentile")
DEFAULT_OP_TYPES = ("Conv", "MatMul")
# softmax(q k^T) v, in the ViT blocks and in the resampler: symmetric int8 over the
# probabilities' range [-1, 1] rounds every attention weight under 1/254 to 0, and softmax over
# 1024 patches spreads attention in such weights. These are the only sensitive layers of both
# sensitivity tables (bench/RESULTS.md): nano `blocks.1.attn_v` alone 0.78; full width (1664 /
# 4096 wide) `resampler.attn_v` alone 0.988, every other layer alone >= 0.9998.
DEFAULT_EXCLUDE = ("blocks.*.attn_v", "resampler.attn_v")
LARGE_MODEL_BYTES = 2 << 30  # protobuf limit: above it weights go to <name>.data
RESAMPLER = ("kv_proj", "k_proj", "v_proj", "resampler.attn_qk", "resampler.attn_v", "pool_out")
QUERY_CONSTS = ("q_heads",)  # the resampler's queries, projected and folded by the exporter
ALIASES = {"conv_w": "conv1"}  # the patch embedding's weight


class VisionQuantError(EdgeError, RuntimeError):
    """The vision engine could not be quantized; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Calibration images
# ---------------------------------------------------------------------------------------------

@dataclass
class SplitImages:
    """Preprocessed pictures of one manifest split, one per distinct image.

    ``item_ids[i]`` lists every manifest item that shows picture ``i`` (items share images: a
    photo has a caption and a VQA item); ``names[i]`` describes the picture.
    """

    split: str
    names: list[str]
    item_ids: list[list[str]]
    pixels: np.ndarray  # [N, 3, S, S] float32

    def all_item_ids(self) -> list[str]:
        return [i for ids in self.item_ids for i in ids]


def split_images(manifest: Any, split: str, image_size: int, limit: int | None = None,
                 kinds: Sequence[str] | None = None) -> SplitImages:
    """Distinct pictures of ``split`` (``kinds``: "skimage", "file", "generator"; None: all),
    ``limit`` of them spread evenly over the manifest order, preprocessed like the runtime."""
    from calib_data.manifest import ManifestError, load_manifest, materialise
    from runtime.image import preprocess

    items = load_manifest(manifest, verify="exists") if isinstance(manifest, (str, Path)) \
        else manifest
    groups: dict[str, list[Any]] = {}
    for it in items:
        if it.split == split and (kinds is None or it.kind in kinds):
            groups.setdefault(it.sha256 or it.describe_image(), []).append(it)
    keys = list(groups)
    if not keys:
        raise ManifestError(f"the manifest has no {split}-split images"
                            f"{' of kind ' + '/'.join(kinds) if kinds else ''}")
    if limit is not None and limit < len(keys):
        keys = [keys[int(j)] for j in np.linspace(0, len(keys) - 1, max(limit, 1)).round()]
    pixels = np.empty((len(keys), 3, image_size, image_size), np.float32)
    for j, k in enumerate(keys):
        pixels[j] = preprocess(materialise(groups[k][0]), image_size)
    return SplitImages(split=split, names=[groups[k][0].describe_image() for k in keys],
                       item_ids=[[it.id for it in groups[k]] for k in keys], pixels=pixels)


def calibration_images(manifest: Any, image_size: int, limit: int | None = None) -> SplitImages:
    """The calibration split's pictures; the only images :func:`quantize_vision` accepts."""
    return split_images(manifest, CALIB_SPLIT, image_size, limit)


class PixelReader:
    """``CalibrationDataReader`` over preprocessed pixels, one image per batch (the ranges are
    per tensor, so batching changes nothing but the memory the calibrator holds)."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        self.start, self.end, self.pos = 0, len(self.pixels), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = self.start + self.pos
        if i >= self.end:
            return None
        self.pos += 1
        return {PIXELS: self.pixels[i:i + 1]}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        d = self.get_next()
        if d is None:
            raise StopIteration
        return d

    def __len__(self) -> int:
        return len(self.pixels)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.pos = start_index, min(end_index, len(self.pixels)), 0


# ---------------------------------------------------------------------------------------------
# Layer labels
# ---------------------------------------------------------------------------------------------

def _scopes(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return [str(s) for s in ast.literal_eval(p.value)]
            except (ValueError, SyntaxError):
                return []
    return []


def layer_labels(model) -> dict[str, str]:
    """``{node name: layer label}`` for every node, from the module scopes the exporter recorded
    (the node name when it recorded none). See the module docstring for the labels."""
    inits = {t.name for t in model.graph.initializer}
    inits |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    softmax_out = {o for n in model.graph.node if n.op_type == "Softmax" for o in n.output}
    out = {}
    for n in model.graph.node:
        scopes = _scopes(n)
        module = scopes[-2] if len(scopes) >= 3 else ""
        consts = [i for i in n.input if i in inits]
        if n.op_type == "MatMul" and scopes and (not consts or consts[0] in QUERY_CONSTS):
            # activation x activation: softmax(q k^T) x v, or the resampler's fixed queries x k
            kind = "attn_v" if any(i in softmax_out for i in n.input) else "attn_qk"
            label = f"{module or 'resampler'}.{kind}"
        elif module:
            label = module
        elif consts and scopes:
            label = ALIASES.get(consts[0], consts[0])
        else:
            label = n.name
        out[n.name] = label
    return out


def matches(label: str, patterns: Iterable[str]) -> bool:
    """A label matches a pattern equal to it, a glob of it (``blocks.*.attn``), a module above
    it (``blocks.3``), or the group ``resampler`` (its projections and attention)."""
    for p in patterns:
        if label == p or label.startswith(p + ".") or fnmatch.fnmatchcase(label, p) or \
                (p == "resampler" and label in RESAMPLER):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------

@dataclass
class Int8Config:
    """How to quantize; the defaults are the measured choice (bench/RESULTS.md).

    MinMax, per-channel weights, every Conv / MatMul int8 except the softmax(.) v matmuls
    (``DEFAULT_EXCLUDE``): worst validation photo vs fp32 0.99940 on the full-width 2-layer
    random tower (0.98816 with the resampler's softmax(.) v int8 too) at 2.1x the fp32 speed on
    CPU, and 0.99927 on the nano model; the other methods were within 0.0005 of MinMax on nano
    and calibrate in minutes instead of seconds.

    ``exclude``: layer labels / modules kept float. ``only``: quantize just these (the
    sensitivity table quantizes one layer at a time). ``percentile`` is used by the
    "percentile" method only. ``calib_stride``: at most this many images' activations are held
    at once (the histogram methods keep whole tensors: ~0.6 GB per full-width image).
    ``pictures``: how many calib-split pictures an export calibrates on, spread over the split
    (:func:`calibration_images`' ``limit``; None: all). Calibration runs the unoptimised fp32
    graph once per picture (full size: about a minute each on 2 CPU cores), and more pictures
    did not help: bench/RESULTS.md, "how many calibration pictures".
    """

    method: str = "minmax"
    per_channel: bool = True
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    only: tuple[str, ...] | None = None
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    percentile: float = 99.999
    calib_stride: int = 4
    pictures: int | None = 16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method '{self.method}': use one of "
                             f"{', '.join(METHODS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Int8Result:
    """What was written: the engine and which nodes are int8 / stayed float."""

    onnx_path: Path
    config: Int8Config
    calib_item_ids: list[str]
    quantized: dict[str, str]  # node name -> label
    kept_float: dict[str, str]
    op_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"onnx_path": str(self.onnx_path), "config": self.config.to_dict(),
                "calib_items": len(self.calib_item_ids),
                "quantized_labels": sorted(set(self.quantized.values())),
                "float_labels": sorted(set(self.kept_float.values())),
                "op_counts": self.op_counts}


def select_nodes(model, config: Int8Config) -> tuple[dict[str, str], dict[str, str]]:
    """(nodes to quantize, quantizable nodes kept float), each ``{name: label}``."""
    labels = layer_labels(model)
    quant, keep = {}, {}
    for n in model.graph.node:
        if n.op_type not in config.op_types:
            continue
        lab = labels[n.name]
        chosen = (config.only is None or matches(lab, config.only)) and \
            not matches(lab, config.exclude)
        (quant if chosen else keep)[n.name] = lab
    return quant, keep


def _stride(n: int, most: int) -> int:
    """The largest divisor of ``n`` up to ``most``: onnxruntime wants equal strides.

    (Not ``CalibMaxIntermediateOutputs``: onnxruntime 1.32's MinMax calibrator *drops* the
    outputs collected so far each time that many are held, so only the last images count.)
    """
    return max(d for d in range(1, max(1, min(most, n)) + 1) if n % d == 0)


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _calibrator(config: Int8Config, fp32_onnx: Path, augmented: Path, large: bool):
    """onnxruntime's calibrator of ``config.method``, as ``quantize_static`` would create it
    (``create_calibrator`` with our extra options; not called itself because it opens the
    calibration session while the calibrator still holds its copy of the model)."""
    from onnxruntime.quantization import calibrate as c

    common = {"op_types_to_calibrate": list(config.op_types),
              "augmented_model_path": str(augmented), "use_external_data_format": large}
    if config.method == "minmax":
        return c.MinMaxCalibrater(fp32_onnx, **common)
    if config.method == "entropy":
        return c.EntropyCalibrater(fp32_onnx, **common)
    return c.PercentileCalibrater(fp32_onnx, symmetric=True, percentile=config.percentile,
                                  **common)


def calibrate(fp32_onnx: str | Path, calib: SplitImages, config: Int8Config, cache: Path,
              scratch: Path, large: bool) -> None:
    """Compute the tensor ranges with onnxruntime's calibrator and store them as
    ``quantize_static``'s calibration cache (``cache``), which it then reads instead of
    calibrating.

    Inside ``quantize_static`` the weights are held three times at once: its own model, the
    calibrator's copy and the calibration session (full size: 3 x 7.7 GB). Here the
    calibrator's copy is dropped as soon as the augmented graph is on disk, and the session
    runs without the CPU memory arena (which grew by ~1.3 GiB per image on the 4-layer
    full-width tower) and in priority order: in onnxruntime's default order the graph's
    ReduceMin/ReduceMax outputs run after the whole forward pass, holding every calibrated
    tensor of every layer (+1.33 GiB per image at 4 of 48 layers; at 48 the export was
    OOM-killed at 22.6 GiB); in priority order +0.29 GiB. A graph with external weights gets an
    augmented graph beside it that reads the same weights file (the calibrator would write a
    second 7.7 GB copy); others are augmented in ``scratch``. The ranges are the same: same
    calibrator, same graph, same images, merged in strides of ``config.calib_stride`` as
    before.
    """
    from onnxruntime.quantization.calibrate import save_tensors_data

    from runtime.engines import open_session

    fp32_onnx = Path(fp32_onnx)
    work = Path(tempfile.mkdtemp(prefix="calibrate-", dir=scratch))
    external = _external_weights(fp32_onnx)
    augmented = (fp32_onnx.with_name(f".{fp32_onnx.stem}.augmented-{work.name}.onnx")
                 if external else work / "augmented.onnx")
    try:
        with _quiet():
            calibrator = _calibrator(config, fp32_onnx, augmented, large)
            _point_at(calibrator.model, external)
            calibrator.augment_graph()
            calibrator.model = None  # only the augmented file is needed from here on
            gc.collect()
            # the calibrator's own session settings (no graph optimisation), without the arena,
            # each min/max read as soon as its tensor exists (by default all are read at the end)
            calibrator.infer_session = open_session(augmented, ["CPUExecutionProvider"],
                                                    level="disable", mem_arena=False,
                                                    priority_order=True)
            reader = PixelReader(calib.pixels)
            stride = _stride(len(reader), config.calib_stride)
            for start in _progress(range(0, len(reader), stride), "calibrating", stride):
                reader.set_range(start, start + stride)
                calibrator.collect_data(reader)
            ranges = calibrator.compute_data()
        del calibrator
    finally:
        augmented.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    save_tensors_data(ranges, cache)


def _external_weights(onnx_path: Path) -> dict[str, Any]:
    """``{initializer: its external-data entries}`` of a graph whose weights live in files."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return {t.name: list(t.external_data) for t in m.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def _point_at(model, external: dict[str, Any]) -> None:
    """Make ``model``'s loaded initializers refer to their original external data again, so
    that saving it (in the original's folder) writes the graph only."""
    import onnx

    for t in model.graph.initializer:
        entries = external.get(t.name)
        if entries is not None:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.extend(entries)


def _progress(it, desc: str, stride: int):
    """tqdm over the calibration strides (the full-size tower takes ~1 min per image)."""
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit=f"x{stride} images", leave=False,
                disable=not log.isEnabledFor(logging.INFO))


def calibration_cache(cache_dir: Path, config: Int8Config, model, calib: SplitImages) -> Path:
    """Where the tensor ranges of one calibration method live (shared by every variant), keyed
    by the graph and the calibration pixels so a changed model or set never reuses stale ones."""
    h = hashlib.sha256(model.graph.SerializeToString())
    h.update(np.ascontiguousarray(calib.pixels).tobytes())
    tag = config.method + (f"-{config.percentile:g}" if config.method == "percentile" else "")
    return Path(cache_dir) / f"ranges-{tag}-{'-'.join(config.op_types)}-{h.hexdigest()[:16]}.json"


def quantize_vision(fp32_onnx: str | Path, out_path: str | Path, calib: SplitImages,
                    config: Int8Config | None = None,
                    cache_dir: str | Path | None = None) -> Int8Result:
    """Write the QDQ int8 engine of ``fp32_onnx`` to ``out_path``, atomically.

    ``calib`` must be the calibration split (:func:`calibration_images`). ``cache_dir`` keeps
    the calibrated tensor ranges per method, so variants that differ only in which layers are
    quantized (the sensitivity table) calibrate once.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    config = config or Int8Config()
    if calib.split != CALIB_SPLIT:
        raise VisionQuantError(f"calibration images come from the '{calib.split}' split: "
                               "calibrate on the calib split only (calibration_images)")
    if len(calib.pixels) == 0:
        raise VisionQuantError("no calibration images: the manifest's calib split is empty")
    out_path = Path(out_path)
    model = onnx.load(str(fp32_onnx), load_external_data=False)
    quant, keep = select_nodes(model, config)
    if not quant:
        raise VisionQuantError(f"no {'/'.join(config.op_types)} node is left to quantize "
                               f"(exclude={list(config.exclude)}, only={config.only})")
    large = sum(t.ByteSize() for t in model.graph.initializer) > LARGE_MODEL_BYTES or any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    # Only the inputs of a conv / matmul are quantized (TensorRT's placement); quantizing their
    # outputs too would put the attention scores through int8 before the softmax.
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True,
             "OpTypesToExcludeOutputQuantization": list(config.op_types)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    try:
        cache = calibration_cache(Path(cache_dir or tmp_dir), config, model, calib)
        if not cache.is_file():
            calibrate(fp32_onnx, calib, config, cache, tmp_dir, large)
        tmp = tmp_dir / out_path.name
        with _quiet():
            quantize_static(
                str(fp32_onnx), str(tmp), PixelReader(calib.pixels), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(config.op_types), per_channel=config.per_channel,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=list(quant), use_external_data_format=large,
                calibrate_method=_method(config.method), extra_options=extra,
                calibration_cache_path=cache)  # a cache hit: it never calibrates itself
        counts = _finish(tmp, model)
        if large and (tmp_dir / (out_path.name + ".data")).exists():
            os.replace(tmp_dir / (out_path.name + ".data"), out_path.with_name(
                out_path.name + ".data"))
        os.replace(tmp, out_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("int8 vision engine %s: %d nodes int8 (%s), %d kept float", out_path, len(quant),
             config.method, len(keep))
    return Int8Result(out_path, config, calib.all_item_ids(), quant, keep, counts)


class _DropPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in str(record.msg)


@contextlib.contextmanager
def _quiet():
    """onnxruntime's calibrators print progress to stdout (which carries the benchmarks' JSON)
    and advise ``quant_pre_process`` on every call. That step is skipped on purpose: its graph
    optimizer fuses and renames nodes, losing the layer labels, and ``quantize_static`` runs
    the shape inference itself. Both go to DEBUG."""
    buf = io.StringIO()
    flt = _DropPreprocessAdvice()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        root.removeFilter(flt)
        for line in buf.getvalue().splitlines():
            log.debug("onnxruntime.quantization: %s", line)


def _finish(path: Path, fp32_model) -> dict[str, int]:
    """Check the engine contract survived, stamp the metadata, return the op counts.

    Only the graph is rewritten: external weights (``<name>.data``) keep their references.
    """
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for got, want in ((m.graph.input, fp32_model.graph.input),
                      (m.graph.output, fp32_model.graph.output)):
        if [(v.name, v.type.tensor_type.elem_type) for v in got] != \
                [(v.name, v.type.tensor_type.elem_type) for v in want]:
            raise VisionQuantError(f"quantization changed the engine I/O to "
                                   f"{[v.name for v in got]}: report this with the model")
    meta = {p.key: p.value for p in fp32_model.metadata_props}
    meta[META_PREFIX + "precision"] = "int8"
    meta[META_PREFIX + "quantization"] = "static QDQ int8 (symmetric activations and weights)"
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    m.producer_name = fp32_model.producer_name or m.producer_name
    onnx.save(m, str(path))
    return dict(Counter(n.op_type for n in m.graph.node).most_common())


def qdq_summary(onnx_path: str | Path) -> dict[str, Any]:
    """Counts of QuantizeLinear / DequantizeLinear and the ops that read dequantized tensors."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    dq_out = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    fed = Counter(n.op_type for n in m.graph.node
                  if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                  and any(i in dq_out for i in n.input))
    ops = Counter(n.op_type for n in m.graph.node)
    return {"quantize_linear": ops.get("QuantizeLinear", 0),
            "dequantize_linear": ops.get("DequantizeLinear", 0), "int8_inputs_of": dict(fed)}


__all__ = ["CALIB_SPLIT", "Int8Config", "Int8Result", "PixelReader", "SplitImages",
           "VisionQuantError", "calibration_images", "layer_labels", "matches", "qdq_summary",
           "quantize_vision", "select_nodes", "split_images"]
