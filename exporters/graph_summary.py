"""What an exported ONNX graph holds: op counts, sizes, I/O, the dtypes LayerNorm / Softmax /
MatMul run in, and the ``qwenvl_edge.*`` metadata the exporter wrote. Read without the weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

META_PREFIX = "qwenvl_edge."


def onnx_metadata(onnx_path: str | Path) -> dict[str, str]:
    """``qwenvl_edge.*`` metadata of an exported engine (weights not loaded)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key[len(META_PREFIX):]: p.value for p in m.metadata_props
            if p.key.startswith(META_PREFIX)}


def graph_summary(onnx_path: str | Path) -> dict[str, Any]:
    """Op counts, sizes, I/O and the dtypes LayerNormalization / Softmax run in."""
    import onnx

    path = Path(onnx_path)
    m = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(m)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(g.value_info) + list(g.input) + list(g.output)}
    for t in g.initializer:
        types[t.name] = t.data_type
    dname = {v: onnx.helper.tensor_dtype_to_np_dtype(v).name
             for v in set(types.values()) if v}

    def in_dtypes(op: str) -> dict[str, int]:
        c = Counter(dname.get(types.get(n.input[0], 0), "?") for n in g.node if n.op_type == op)
        return dict(c)

    n_params = 0
    n_bytes = 0
    init_dtypes: Counter = Counter()
    for t in m.graph.initializer:
        numel = int(np.prod(t.dims)) if len(t.dims) else 1
        n_params += numel
        dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        n_bytes += numel * dt.itemsize
        init_dtypes[dt.name] += numel

    def io(v) -> dict[str, Any]:
        tt = v.type.tensor_type
        return {"name": v.name, "dtype": dname.get(tt.elem_type, str(tt.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in tt.shape.dim]}

    files = {p.name: p.stat().st_size for p in (path, path.with_name(path.name + ".data"))
             if p.exists()}
    return {
        "ir_version": m.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "nodes": len(m.graph.node),
        "op_counts": dict(Counter(n.op_type for n in m.graph.node).most_common()),
        "initializers": len(m.graph.initializer),
        "parameters": n_params,
        "weight_bytes": n_bytes,
        "weight_dtypes": dict(init_dtypes),
        "external_data": any(t.data_location == onnx.TensorProto.EXTERNAL
                             for t in m.graph.initializer),
        "file_bytes": files,
        "inputs": [io(v) for v in m.graph.input],
        "outputs": [io(v) for v in m.graph.output],
        "layernorm_input_dtypes": in_dtypes("LayerNormalization"),
        "softmax_input_dtypes": in_dtypes("Softmax"),
        "matmul_input_dtypes": in_dtypes("MatMul"),
    }


def summary_line(s: dict[str, Any]) -> str:
    ops = ", ".join(f"{k} {v}" for k, v in list(s["op_counts"].items())[:12])
    size = sum(s["file_bytes"].values()) / 2**20
    return (f"{s['nodes']} nodes ({ops}); {s['parameters'] / 1e6:.1f} M parameters "
            f"{dict(s['weight_dtypes'])}; {size:.1f} MiB on disk"
            f"{' (external data)' if s['external_data'] else ''}; IR {s['ir_version']}, "
            f"opset {s['opsets']}; LayerNorm in {s['layernorm_input_dtypes']}, "
            f"Softmax in {s['softmax_input_dtypes']}")
