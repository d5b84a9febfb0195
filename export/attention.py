"""Fused attention in the exported graphs: onnxruntime's `com.microsoft::MultiHeadAttention`.

Why: the TorchScript exporter writes every scaled-dot-product attention as MatMul -> Softmax ->
MatMul, and onnxruntime then materialises the whole score tensor. At 512x512x16 the UNet's largest
one is 128 x 4096 x 4096 fp32 = 8 GiB (and the Softmax output another 8), so onnxruntime ran out
of 24 GiB where PyTorch's SDPA needs 8.6 GiB. onnxruntime's contrib op is memory-efficient on CPU
(0.81 GiB peak at that shape), and its transformers optimizer cannot fuse our graphs (it fails to
read the dynamically computed head count), so the exporter emits the op itself.

How: `fused_attention(model, ...)` swaps every diffusers `Attention` module's processor for
`FusedAttnProcessor` (AttnProcessor2_0's math, with the attention core as `MultiHeadAttentionOp`,
whose forward is SDPA and whose ONNX symbolic is the contrib op) for the duration of a trace, and
restores the original processors afterwards. Which runtime gets which graph: see
`lcm_edge.backends.ort_backend.select_onnx_graph`. `unfuse_attention` rewrites a fused graph back
to plain ops (the pattern torch's own SDPA export writes, which OpenVINO fuses to
ScaledDotProductAttention and TensorRT takes), over the same weights, so both graphs can share one
external-data file.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from lcm_edge.errors import InvalidArgumentError

ATTENTION_MODES = ("fused", "plain")
FUSED_ATTENTION_DOMAIN = "com.microsoft"
FUSED_ATTENTION_OP = "MultiHeadAttention"
FUSED_ATTENTION_OPSET = 1
# How count_ops names the op.
FUSED_OP_KEY = f"{FUSED_ATTENTION_DOMAIN}::{FUSED_ATTENTION_OP}"


def check_attention(attention: str) -> str:
    if attention not in ATTENTION_MODES:
        raise InvalidArgumentError("attention", f"{attention!r} is not one of {ATTENTION_MODES}",
                                   "use 'fused' (onnxruntime's memory-efficient MultiHeadAttention, plus a plain "
                                   "graph for TensorRT and OpenVINO) or 'plain' (standard ONNX ops only)")
    return attention


class MultiHeadAttentionOp(torch.autograd.Function):
    """(B, S, heads*d) query, (B, L, heads*d) key and value -> (B, S, heads*d).

    forward is torch's SDPA (what the gate's reference runs); symbolic is the contrib op, whose
    inputs are the projections before the head split, as here."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int,
                scale: float) -> torch.Tensor:
        batch, length = query.shape[0], query.shape[1]
        heads = [t.reshape(batch, t.shape[1], num_heads, -1).transpose(1, 2) for t in (query, key, value)]
        out = F.scaled_dot_product_attention(*heads, dropout_p=0.0, is_causal=False, scale=scale)
        return out.transpose(1, 2).reshape(batch, length, -1)

    @staticmethod
    def symbolic(g, query, key, value, num_heads: int, scale: float):
        out = g.op(f"{FUSED_ATTENTION_DOMAIN}::{FUSED_ATTENTION_OP}", query, key, value,
                   num_heads_i=num_heads, scale_f=scale)
        out.setType(query.type())
        return out


class FusedAttnProcessor:
    """diffusers' AttnProcessor2_0, step for step, with the attention core as MultiHeadAttentionOp.

    Covers what SD1.5, AnimateDiff motion modules (positional embeddings are added by the
    transformer block before attention) and the VAE's mid-block use: spatial norm, 4D inputs,
    group norm, cross-attention norm, residual connection, output rescaling. Attention masks and
    per-head q/k norms are refused rather than ignored: those models never pass them."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise InvalidArgumentError("attention", "fused attention got an attention mask, which it does not "
                                       "export", "export with attention='plain'")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = _head_dim(attn)
        # AttnProcessor2_0 leaves SDPA's default scale, 1/sqrt(head_dim), whatever attn.scale says.
        hidden_states = MultiHeadAttentionOp.apply(query, key, value, attn.heads, head_dim ** -0.5)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _head_dim(attn) -> int:
    widths = {attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features}
    if len(widths) != 1 or attn.to_q.out_features % attn.heads:
        raise InvalidArgumentError("attention", f"an Attention module with q/k/v widths {sorted(widths)} and "
                                   f"{attn.heads} heads, which MultiHeadAttention cannot take",
                                   "export with attention='plain'")
    if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
        raise InvalidArgumentError("attention", "an Attention module with per-head q/k norms",
                                   "export with attention='plain'")
    return attn.to_q.out_features // attn.heads


def _swappable(processor) -> bool:
    """Processors whose math FusedAttnProcessor reproduces (AttnProcessor is the pre-SDPA twin)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return type(processor) in (AttnProcessor, AttnProcessor2_0)


@contextmanager
def fused_attention(*models: torch.nn.Module) -> Iterator[int]:
    """Within the block, every attention of `models` (diffusers models with set_attn_processor) runs
    FusedAttnProcessor; yields how many processors were swapped. The originals are restored on exit,
    also after an error, so the same models stay the torch reference of the parity gate."""
    saved = []
    try:
        for model in models:
            processors = dict(model.attn_processors)
            other = sorted({type(p).__name__ for p in processors.values() if not _swappable(p)})
            if other:
                raise InvalidArgumentError("attention", f"{type(model).__name__} uses attention processors {other}, "
                                           "whose math the fused export does not reproduce",
                                           "export with attention='plain', or reset them with "
                                           "set_default_attn_processor()")
            saved.append((model, processors))
            model.set_attn_processor(FusedAttnProcessor())
        yield sum(len(p) for _, p in saved)
    finally:
        for model, processors in saved:
            model.set_attn_processor(processors)


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type ('domain::op' outside the default domain); subgraphs included."""
    counts: dict[str, int] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            counts[key] = counts.get(key, 0) + 1
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    walk(attribute.g)
                for sub in attribute.graphs:
                    walk(sub)

    walk(model.graph)
    return counts



def unfuse_attention(model: onnx.ModelProto) -> int:
    """Replace every MultiHeadAttention node of `model` (in place) by standard ops; returns how many.

    The replacement is the sequence torch's SDPA export writes at opset 17 (sqrt(scale) on q and on
    k^T, MatMul, Softmax, MatMul), the pattern OpenVINO fuses to ScaledDotProductAttention. Only
    small constants are added; the weights are untouched, so external-data references stay valid."""
    graph = model.graph
    # The scale constant takes the attention's element type (float32, or float16 in fp16 graphs).
    inferred = onnx.shape_inference.infer_shapes(model).graph
    elem_types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input)}
    nodes = []
    replaced = 0
    for node in graph.node:
        if node.domain != FUSED_ATTENTION_DOMAIN or node.op_type != FUSED_ATTENTION_OP:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) != 3 or set(attrs) - {"num_heads", "scale"} or "num_heads" not in attrs:
            raise InvalidArgumentError("model", f"{node.name}: a MultiHeadAttention node with inputs "
                                       f"{list(node.input)} and attributes {sorted(attrs)}, not the exporter's",
                                       "unfuse only graphs written with attention='fused'")
        query, key, value = node.input
        if query not in elem_types:
            raise InvalidArgumentError("model", f"{node.name}: the element type of its query '{query}' is unknown",
                                       "unfuse graphs written by the exporter (their types are inferable)")
        dtype = helper.tensor_dtype_to_np_dtype(elem_types[query])
        num_heads = int(attrs["num_heads"])
        scale = float(attrs["scale"])
        p = f"{node.name or node.output[0]}/unfused"
        heads = f"{p}/heads_and_rest"
        rest = f"{p}/rest"
        root = f"{p}/sqrt_scale"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([num_heads, -1], dtype=np.int64), heads),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), rest),
            numpy_helper.from_array(np.array(math.sqrt(scale), dtype=dtype), root),
        ])
        make = helper.make_node
        # Target shapes come from the inputs' (batch, length), as in torch's own export of this attention: the
        # graph OpenVINO's ScaledDotProductAttention fusion was checked on at full size.
        nodes += [
            make("Shape", [query], [f"{p}/q_batch_len"], start=0, end=2, name=f"{p}/q_shape"),
            make("Shape", [key], [f"{p}/kv_batch_len"], start=0, end=2, name=f"{p}/kv_shape"),
            make("Concat", [f"{p}/q_batch_len", heads], [f"{p}/q_split"], axis=0, name=f"{p}/q_split"),
            make("Concat", [f"{p}/kv_batch_len", heads], [f"{p}/kv_split"], axis=0, name=f"{p}/kv_split"),
            make("Concat", [f"{p}/q_batch_len", rest], [f"{p}/merge"], axis=0, name=f"{p}/merge"),
            make("Reshape", [query, f"{p}/q_split"], [f"{p}/q4"], name=f"{p}/q_reshape"),
            make("Transpose", [f"{p}/q4"], [f"{p}/q"], perm=[0, 2, 1, 3], name=f"{p}/q_transpose"),
            make("Reshape", [key, f"{p}/kv_split"], [f"{p}/k4"], name=f"{p}/k_reshape"),
            make("Transpose", [f"{p}/k4"], [f"{p}/kt"], perm=[0, 2, 3, 1], name=f"{p}/k_transpose"),
            make("Reshape", [value, f"{p}/kv_split"], [f"{p}/v4"], name=f"{p}/v_reshape"),
            make("Transpose", [f"{p}/v4"], [f"{p}/v"], perm=[0, 2, 1, 3], name=f"{p}/v_transpose"),
            make("Mul", [f"{p}/q", root], [f"{p}/q_scaled"], name=f"{p}/q_scale"),
            make("Mul", [f"{p}/kt", root], [f"{p}/kt_scaled"], name=f"{p}/k_scale"),
            make("MatMul", [f"{p}/q_scaled", f"{p}/kt_scaled"], [f"{p}/scores"], name=f"{p}/scores"),
            make("Softmax", [f"{p}/scores"], [f"{p}/probs"], axis=-1, name=f"{p}/softmax"),
            make("MatMul", [f"{p}/probs", f"{p}/v"], [f"{p}/context"], name=f"{p}/context"),
            make("Transpose", [f"{p}/context"], [f"{p}/context_t"], perm=[0, 2, 1, 3], name=f"{p}/out_transpose"),
            make("Reshape", [f"{p}/context_t", f"{p}/merge"], [node.output[0]], name=f"{p}/out_reshape"),
        ]
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(n.domain == FUSED_ATTENTION_DOMAIN for n in nodes):
        kept = [o for o in model.opset_import if o.domain != FUSED_ATTENTION_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return replaced


def write_unfused(fused_path, plain_path) -> int:
    """Write `plain_path`: the graph at `fused_path` with its attention unfused (unfuse_attention), referencing
    the same external-data file (both must sit in one folder). Returns the number of nodes unfused."""
    if fused_path.parent != plain_path.parent:
        raise InvalidArgumentError("plain_path", f"'{plain_path}' is not beside '{fused_path}'",
                                   "write both graphs into one folder, so they share one weights file")
    model = onnx.load(str(fused_path), load_external_data=False)
    replaced = unfuse_attention(model)
    tmp = plain_path.with_name(plain_path.name + ".partial")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, plain_path)
    onnx.checker.check_model(str(plain_path))
    return replaced


def single_attention_model(num_heads: int, head_dim: int, *, dtype=np.float32) -> onnx.ModelProto:
    """A one-node graph: query, key, value (batch, length, num_heads*head_dim) -> output, through the exporter's
    MultiHeadAttention node (unfuse_attention turns it into the plain pattern). For benchmarks and tests."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    width = num_heads * head_dim

    def value(name: str, length: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, ["batch", length, width])

    node = helper.make_node(FUSED_ATTENTION_OP, ["query", "key", "value"], ["output"], name="attention",
                            domain=FUSED_ATTENTION_DOMAIN, num_heads=num_heads, scale=head_dim ** -0.5)
    graph = helper.make_graph([node], "attention", [value("query", "q_len"), value("key", "kv_len"),
                                                    value("value", "kv_len")], [value("output", "q_len")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(FUSED_ATTENTION_DOMAIN, FUSED_ATTENTION_OPSET)])
