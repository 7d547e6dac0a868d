"""Expand an onnxruntime-genai model built at a few layers to the full depth and vocabulary.

onnxruntime-genai's builder loads the whole Hugging Face model through transformers, so it cannot
build the 32-layer decoder on a 24 GB machine; the graph it builds can run 32 layers. This tool
copies the builder's last layer (its general form: layer 0 has no residual input and differs) once
per missing layer, renaming nodes, values, weights and the KV inputs/outputs per layer, moves the
final norm (which the builder names after layer ``L``) behind the new last layer, widens the
embedding and LM head to ``--vocab`` rows, and gives every new tensor fresh values of the same
shape and dtype (sampled from the template tensor, so scales and norms stay in range). Speed
depends on shapes and dtypes only; the values are random either way (``bench.decoder`` uses a
random-weight checkpoint).

    python -m bench.genai_expand --model <built-2-layer> --out <expanded> --layers 32 --vocab 151936

Weights stream into ``model.onnx.data`` one tensor at a time (the full-size result is ~7 GB), and
``--check`` runs a short prompt through onnxruntime to prove the logits are finite. Only numpy and
onnx at import time (onnxruntime for ``--check``): it runs in either virtual environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx

from runtime.errors import EdgeError

log = logging.getLogger("bench.genai_expand")
DATA = "model.onnx.data"
VOCAB_PREFIXES = ("model.embed_tokens.", "lm_head.")  # initializers with one row per token
_INDEX = re.compile(r"(layers\.|past_key_values\.|present\.)(\d+)(?=[./])")
_CHUNK = 1 << 22  # elements sampled per step (32 MiB of 8-byte words)


class ExpandError(EdgeError, ValueError):
    """The model is not one this tool can expand (too few layers, unexpected naming)."""


def layer_of(name: str) -> int | None:
    """Layer index a builder name belongs to (``/model/layers.3/...``, ``model.layers.3.``,
    ``past_key_values.3.key``, ``present.3.value``); None for shared names."""
    m = _INDEX.search(name)
    return int(m.group(2)) if m else None


def renamer(mapping: dict[int, int]) -> Callable[[str], str]:
    """Rename every layer index in a name at once (``{1: 5, 0: 4}`` never chains)."""
    def sub(m: re.Match) -> str:
        i = int(m.group(2))
        return m.group(1) + str(mapping.get(i, i))
    return lambda name: _INDEX.sub(sub, name) if name else name


@dataclass
class Plan:
    """What becomes of the built model: ``built`` layers -> ``layers``, ``vocab_old`` ->
    ``vocab`` rows. Layers ``0..built-2`` stay, layer ``built-1`` is the template, names of
    layer ``built`` (the final norm) and after move to ``layers``."""
    built: int
    layers: int
    vocab_old: int
    vocab: int

    def copies(self) -> list[Callable[[str], str]]:
        t = self.built - 1
        return [renamer({t: i, t - 1: i - 1}) for i in range(t, self.layers)]

    def tail(self) -> Callable[[str], str]:
        return renamer({self.built: self.layers, self.built - 1: self.layers - 1})

    def expand(self, items: list, name_of: Callable) -> list[tuple]:
        """Each item with the renamer it is emitted with: items of earlier layers unchanged,
        each contiguous run of template items repeated once per layer in place (the builder
        orders nodes layer by layer, KV inputs all keys then all values), the rest with the
        tail renamer."""
        same, tail, copies = renamer({}), self.tail(), self.copies()
        out: list = []
        run: list = []
        for it in [*items, None]:
            k = None if it is None else layer_of(name_of(it))
            if it is not None and k == self.built - 1:
                run.append(it)
                continue
            out.extend((t, r) for r in copies for t in run)
            run = []
            if it is not None:
                out.append((it, same if k is not None and k < self.built - 1 else tail))
        return out


def built_layers(graph: onnx.GraphProto) -> int:
    n = sum(1 for i in graph.input if re.fullmatch(r"past_key_values\.\d+\.key", i.name))
    if n < 2:
        raise ExpandError(f"the model has {n} layer(s); build at least 2 (layer 0 has no "
                          "residual input, so only a later layer is a template for the rest)")
    return n


def check_template(graph: onnx.GraphProto, built: int) -> None:
    """The template layer may refer only to itself and the layer before it (its input)."""
    t = built - 1
    for node in graph.node:
        if layer_of(node.name) == t:
            bad = {k for n in [*node.input, *node.output] if (k := layer_of(n)) is not None
                   and k not in (t, t - 1)}
            if bad:
                raise ExpandError(f"{node.name} refers to layer(s) {sorted(bad)}: not the "
                                  "builder's naming this tool knows; rebuild or update the tool")


def _rename_node(node: onnx.NodeProto, rn: Callable[[str], str], plan: Plan) -> onnx.NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.name = rn(node.name)
    new.input[:] = [rn(x) for x in node.input]
    new.output[:] = [rn(x) for x in node.output]
    if plan.vocab != plan.vocab_old and any(x.startswith(VOCAB_PREFIXES) for x in node.input):
        for a in new.attribute:
            if a.name == "N" and a.i == plan.vocab_old:
                a.i = plan.vocab
    return new


def _rename_value(v: onnx.ValueInfoProto, rn: Callable[[str], str], plan: Plan):
    new = onnx.ValueInfoProto()
    new.CopyFrom(v)
    new.name = rn(v.name)
    if new.name == "logits":
        for d in new.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value == plan.vocab_old:
                d.dim_value = plan.vocab
    return new


def expand_graph(model: onnx.ModelProto, layers: int, vocab: int | None):
    """The expanded model without weights, and per new initializer the source initializer it
    takes its bytes from (None: copied unchanged; else fresh values sampled from the source)."""
    g = model.graph
    built = built_layers(g)
    check_template(g, built)
    embed = next((t for t in g.initializer if t.name.startswith(VOCAB_PREFIXES[0])), None)
    if embed is None:
        raise ExpandError("no model.embed_tokens.* initializer: not a genai builder model")
    plan = Plan(built, layers, embed.dims[0], vocab or embed.dims[0])
    if layers < built or plan.vocab < plan.vocab_old:
        raise ExpandError(f"cannot shrink {built} layers / {plan.vocab_old} rows to "
                          f"{layers} / {plan.vocab}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    og = out.graph
    for field, fn in (("node", _rename_node), ("input", _rename_value),
                      ("output", _rename_value), ("value_info", _rename_value)):
        items = [fn(it, rn, plan) for it, rn in plan.expand(list(getattr(g, field)),
                                                              lambda x: x.name)]
        og.ClearField(field)
        getattr(og, field).extend(items)
    sources: list[tuple[onnx.TensorProto, onnx.TensorProto, bool]] = []
    for t, rn in plan.expand(list(g.initializer), lambda x: x.name):
        new = onnx.TensorProto()
        new.name, new.data_type = rn(t.name), t.data_type
        dims = list(t.dims)
        if t.name.startswith(VOCAB_PREFIXES) and dims and dims[0] == plan.vocab_old:
            dims[0] = plan.vocab
        new.dims.extend(dims)
        fresh = new.name != t.name or dims != list(t.dims)
        if layer_of(t.name) == built and new.name != t.name:
            fresh = False  # the final norm only moves
        sources.append((new, t, fresh))
    og.ClearField("initializer")
    return out, sources, plan


def source_bytes(t: onnx.TensorProto, base: Path) -> np.ndarray:
    """The raw little-endian bytes of an initializer, memory-mapped when external."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        return np.memmap(base / info["location"], np.uint8, "r", int(info.get("offset", 0)),
                         (int(info["length"]),))
    if t.HasField("raw_data"):
        return np.frombuffer(t.raw_data, np.uint8)
    return np.frombuffer(onnx.numpy_helper.to_array(t).tobytes(), np.uint8)


def fresh_bytes(src: np.ndarray, nbytes: int, itemsize: int, seed: int) -> Iterator[bytes]:
    """``nbytes`` of values drawn (with replacement) from ``src``'s elements, in 8-byte words
    where both sizes allow (whole elements either way), chunk by chunk."""
    word = 8 if nbytes % 8 == 0 and src.size % 8 == 0 and 8 % itemsize == 0 else itemsize
    pool = src.view(np.dtype(f"u{word}") if word in (1, 2, 4, 8) else src.dtype)
    rng = np.random.default_rng(seed)
    n = nbytes // word
    for start in range(0, n, _CHUNK):
        idx = rng.integers(0, pool.size, min(_CHUNK, n - start))
        yield np.asarray(pool[idx]).tobytes()


def write(model: onnx.ModelProto, sources, src_dir: Path, out_dir: Path, seed: int) -> int:
    """Stream every initializer into ``out_dir/model.onnx.data`` (as the builder lays it out:
    one after another) and write ``model.onnx`` referring to it; returns the data bytes."""
    offset = 0
    with open(out_dir / DATA, "wb") as f:
        for new, src, fresh in sources:
            data = source_bytes(src, src_dir)
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(new.data_type).itemsize
            nbytes = int(np.prod(new.dims, dtype=np.int64)) * itemsize
            if fresh:
                for chunk in fresh_bytes(data, nbytes, itemsize,
                                         seed + zlib.crc32(new.name.encode())):
                    f.write(chunk)
            else:
                f.write(memoryview(data))
            new.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", DATA), ("offset", offset), ("length", nbytes)):
                new.external_data.add(key=k, value=str(v))
            offset += nbytes
            model.graph.initializer.append(new)
    onnx.save(model, str(out_dir / "model.onnx"))
    return offset


def expand(src: Path, out: Path, layers: int, vocab: int | None = None, seed: int = 0) -> Path:
    """Expand the genai model folder ``src`` into ``out`` (written in a new folder next to it,
    then renamed, so ``out`` is whole or absent)."""
    cfg = json.loads((src / "genai_config.json").read_text())
    model = onnx.load(str(src / cfg["model"]["decoder"]["filename"]), load_external_data=False)
    new, sources, plan = expand_graph(model, layers, vocab)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    for p in src.iterdir():
        if p.is_file() and p.name not in (DATA, "model.onnx", "genai_config.json"):
            shutil.copy2(p, tmp / p.name)
    size = write(new, sources, src, tmp, seed)
    cfg["model"]["decoder"]["filename"] = "model.onnx"
    cfg["model"]["decoder"]["num_hidden_layers"] = plan.layers
    cfg["model"]["vocab_size"] = plan.vocab
    (tmp / "genai_config.json").write_text(json.dumps(cfg, indent=4))
    tmp.rename(out)
    log.info("expanded %s: %d -> %d layers, %d -> %d rows, %.2f GB of weights", src, plan.built,
             plan.layers, plan.vocab_old, plan.vocab, size / 1e9)
    return out


def check_logits(model_dir: Path, tokens: int = 8, threads: int | None = None) -> dict:
    """One prompt of ``tokens`` ids through onnxruntime (empty KV cache): logits must be finite."""
    from runtime.engines import open_session

    sess = open_session(model_dir / "model.onnx", ["CPUExecutionProvider"], threads)
    cfg = json.loads((model_dir / "genai_config.json").read_text())["model"]
    dec = cfg["decoder"]
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, cfg["vocab_size"], (1, tokens)).astype(np.int64),
            "attention_mask": np.ones((1, tokens), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, dec["num_key_value_heads"], 0, dec["head_size"]),
                                    np.float32)
    logits = sess.run(["logits"], feed)[0]
    return {"shape": list(logits.shape), "finite": bool(np.isfinite(logits).all()),
            "max_abs": float(np.abs(logits).max())}


def signature(path: Path) -> dict:
    """What must match between a built and an expanded model of the same depth: the node
    op-type sequence, graph I/O names, and initializer names, shapes and dtypes."""
    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    return {"ops": [n.op_type for n in g.node], "inputs": [i.name for i in g.input],
            "outputs": [o.name for o in g.output],
            "initializers": sorted((t.name, tuple(t.dims), t.data_type) for t in g.initializer)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.genai_expand",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="genai model folder (>= 2 layers)")
    ap.add_argument("--out", type=Path, required=True, help="new folder for the expanded model")
    ap.add_argument("--layers", type=int, required=True, help="decoder layers of the result")
    ap.add_argument("--vocab", type=int, help="rows of the embedding and LM head (default: same)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="run a prompt; exit 1 on non-finite logits")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.out.exists():
        print(f"error: {args.out} exists; pick a new --out", file=sys.stderr)
        return 2
    try:
        expand(args.model, args.out, args.layers, args.vocab, args.seed)
    except (ExpandError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        res = check_logits(args.out)
        print(json.dumps(res))
        if not res["finite"]:
            print("error: the expanded model gives non-finite logits", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
