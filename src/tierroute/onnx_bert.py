"""Build an ONNX graph of a BERT sentence encoder straight from its safetensors file.

This keeps torch out of both serving and install: the weights are read with numpy
and wired into a standard BERT forward pass (embeddings, post-LN encoder layers,
exact-erf GELU), then mean pooling over the attention mask and L2 normalisation,
as sentence-transformers' all-MiniLM-L6-v2 does.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierroute.errors import MissingDependencyError

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path: Path) -> dict[str, npt.NDArray[Any]]:
    """All tensors of a safetensors file as numpy arrays (a JSON header, then raw bytes)."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    body = memoryview(raw)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=_DTYPES[info["dtype"]])
        tensors[name] = array.reshape(info["shape"]).astype(np.float32, copy=False)
    return tensors


def build_model(
    model_dir: Path,
    overrides: Mapping[str, npt.NDArray[Any]] | None = None,
    int8: bool = False,
) -> bytes:
    """Serialized ONNX model: (input_ids, attention_mask, token_type_ids) -> embeddings.

    `overrides` replaces tensors by name (e.g. `encoder.layer.5.output.dense.weight`):
    a fine-tuned router ships only the tensors it changed and serves them through here.

    `int8`: the weight matmuls run in int8, weights quantised per output column and each
    token's activations per row (symmetric, scale = the row's largest magnitude / 127).
    Per row, not per tensor as onnxruntime's dynamic quantisation does: a text's vector
    then never depends on the other texts of its batch or on their padding, so a prompt
    routes the same alone or in a micro-batch. Attention products stay fp32.
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise MissingDependencyError("the onnx package is missing; run: pip install onnx") from None

    config = json.loads((model_dir / "config.json").read_text())
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    layers = int(config["num_hidden_layers"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    head_dim = hidden // heads
    weights = read_safetensors(model_dir / "model.safetensors")
    weights = {k.removeprefix("bert."): v for k, v in weights.items()}
    for name, value in (overrides or {}).items():
        if name not in weights or weights[name].shape != value.shape:
            raise ValueError(f"override '{name}' {value.shape} matches no tensor of the model")
        weights[name] = np.asarray(value, dtype=np.float32)

    inits: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, value: npt.NDArray[Any]) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def linear(x: str, prefix: str, out: str) -> str:
        weight = np.ascontiguousarray(weights[prefix + ".weight"].T)
        b = const(prefix + ".b", weights[prefix + ".bias"])
        if not int8:
            w = const(prefix + ".wT", weight)
            return node("Add", [node("MatMul", [x, w], out + ".mm"), b], out)
        col_scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127.0
        quantised = np.clip(np.round(weight / col_scale), -127, 127).astype(np.int8)
        wq = const(prefix + ".wq", quantised)
        ws = const(prefix + ".ws", col_scale.astype(np.float32))
        if x not in rows:  # query, key and value read the same input: quantise it once
            rows[x] = quantise_rows(x)
        xq, row_scale = rows[x]
        acc = node(
            "Cast",
            [node("MatMulInteger", [xq, wq, "zp128"], out + ".acc")],
            out + ".accf",
            to=TensorProto.FLOAT,
        )
        y = node("Mul", [node("Mul", [acc, ws], out + ".y0"), row_scale], out + ".y1")
        return node("Add", [y, b], out)

    rows: dict[str, tuple[str, str]] = {}

    def quantise_rows(x: str) -> tuple[str, str]:
        """(x as uint8 around 128, its per-row scale): symmetric, scale = peak / 127."""
        out = x + ".q"
        peak = node("ReduceMax", [node("Abs", [x], out + ".abs"), "axis_last"], out + ".peak")
        row_scale = node(
            "Div", [node("Max", [peak, "tiny12"], out + ".peakc"), "q127"], out + ".rs"
        )
        # uint8 with zero point 128 (values 1..255): onnxruntime's fast u8 x s8 kernels;
        # s8 x s8 ran ten times slower here.
        shifted = node("Round", [node("Div", [x, row_scale], out + ".xs")], out + ".xr")
        xq = node(
            "Cast", [node("Add", [shifted, "q128"], out + ".xu")], out + ".xq", to=TensorProto.UINT8
        )
        return xq, row_scale

    def layer_norm(x: str, prefix: str, out: str) -> str:
        g = const(prefix + ".g", weights[prefix + ".weight"])
        b = const(prefix + ".beta", weights[prefix + ".bias"])
        return node("LayerNormalization", [x, g, b], out, axis=-1, epsilon=eps)

    # Embeddings: word + position + token type, then LayerNorm.
    const("word_emb", weights["embeddings.word_embeddings.weight"])
    const("pos_emb", weights["embeddings.position_embeddings.weight"])
    const("type_emb", weights["embeddings.token_type_embeddings.weight"])
    const("zero", np.array(0, dtype=np.int64))
    const("one", np.array(1, dtype=np.int64))
    const("axis1", np.array([1], dtype=np.int64))
    const("axes12", np.array([1, 2], dtype=np.int64))
    const("axis_last", np.array([-1], dtype=np.int64))
    node("Shape", ["input_ids"], "ids_shape")
    node("Gather", ["ids_shape", "one"], "seq_len", axis=0)
    node("Range", ["zero", "seq_len", "one"], "positions")
    node("Gather", ["word_emb", "input_ids"], "e_word")
    node("Gather", ["pos_emb", "positions"], "e_pos")
    node("Gather", ["type_emb", "token_type_ids"], "e_type")
    node("Add", ["e_word", "e_pos"], "e_wp")
    node("Add", ["e_wp", "e_type"], "e_sum")
    x = layer_norm("e_sum", "embeddings.LayerNorm", "x0")

    # Additive attention mask [B, 1, 1, S]: 0 where attended, -1e4 on padding.
    node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    const("neg", np.array(-1e4, dtype=np.float32))
    const("onef", np.array(1.0, dtype=np.float32))
    node("Sub", ["onef", "mask_f"], "mask_inv")
    node("Mul", ["mask_inv", "neg"], "mask_add2")
    node("Unsqueeze", ["mask_add2", "axes12"], "mask_bias")

    const("tiny12", np.array(1e-12, dtype=np.float32))
    if int8:  # only the quantised linears read these: unused initializers are warned about
        const("q127", np.array(127.0, dtype=np.float32))
        const("q128", np.array(128.0, dtype=np.float32))
        const("zp128", np.array(128, dtype=np.uint8))
    const("split_heads", np.array([0, 0, heads, head_dim], dtype=np.int64))
    const("merge_heads", np.array([0, 0, hidden], dtype=np.int64))
    const("scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))
    const("sqrt2", np.array(np.sqrt(2.0), dtype=np.float32))
    const("half", np.array(0.5, dtype=np.float32))

    for i in range(layers):
        p = f"encoder.layer.{i}"
        q = linear(x, f"{p}.attention.self.query", f"l{i}.q")
        k = linear(x, f"{p}.attention.self.key", f"l{i}.k")
        v = linear(x, f"{p}.attention.self.value", f"l{i}.v")
        qh = node(
            "Transpose",
            [node("Reshape", [q, "split_heads"], f"l{i}.qr")],
            f"l{i}.qh",
            perm=[0, 2, 1, 3],
        )
        kh = node(
            "Transpose",
            [node("Reshape", [k, "split_heads"], f"l{i}.kr")],
            f"l{i}.kh",
            perm=[0, 2, 3, 1],
        )
        vh = node(
            "Transpose",
            [node("Reshape", [v, "split_heads"], f"l{i}.vr")],
            f"l{i}.vh",
            perm=[0, 2, 1, 3],
        )
        att = node("Mul", [node("MatMul", [qh, kh], f"l{i}.qk"), "scale"], f"l{i}.qks")
        att = node("Add", [att, "mask_bias"], f"l{i}.qkm")
        probs = node("Softmax", [att], f"l{i}.p", axis=-1)
        ctx = node(
            "Transpose", [node("MatMul", [probs, vh], f"l{i}.ctx")], f"l{i}.ctxt", perm=[0, 2, 1, 3]
        )
        ctx = node("Reshape", [ctx, "merge_heads"], f"l{i}.ctxm")
        attn_out = linear(ctx, f"{p}.attention.output.dense", f"l{i}.ao")
        x = layer_norm(
            node("Add", [x, attn_out], f"l{i}.res1"), f"{p}.attention.output.LayerNorm", f"l{i}.x1"
        )
        h = linear(x, f"{p}.intermediate.dense", f"l{i}.h")
        erf = node("Erf", [node("Div", [h, "sqrt2"], f"l{i}.hs")], f"l{i}.erf")
        gelu = node(
            "Mul",
            [node("Mul", [h, node("Add", [erf, "onef"], f"l{i}.e1")], f"l{i}.g0"), "half"],
            f"l{i}.gelu",
        )
        out = linear(gelu, f"{p}.output.dense", f"l{i}.o")
        x = layer_norm(node("Add", [x, out], f"l{i}.res2"), f"{p}.output.LayerNorm", f"l{i}.x2")

    # Mean pooling over real tokens, then L2 normalisation.
    node("Unsqueeze", ["mask_f", "axis_last"], "mask3")
    node("Mul", [x, "mask3"], "masked")
    node("ReduceSum", ["masked", "axis1"], "summed", keepdims=0)
    node("ReduceSum", ["mask3", "axis1"], "count", keepdims=0)
    const("tiny", np.array(1e-9, dtype=np.float32))
    node("Max", ["count", "tiny"], "count_c")
    node("Div", ["summed", "count_c"], "pooled")
    node("ReduceL2", ["pooled", "axis_last"], "norm", keepdims=1)
    node("Max", ["norm", "tiny12"], "norm_c")
    node("Div", ["pooled", "norm_c"], "embeddings")

    ints = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    output = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", hidden])
    graph = helper.make_graph(nodes, "sentence_encoder", ints, [output], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data
