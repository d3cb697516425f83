"""Expose each transformer block's output of an exported ONNX graph, to localise a divergence.

The dynamo exporter records each node's module path in the `pkg.torch.onnx.name_scopes` metadata
(e.g. `['', 'blocks', 'blocks.3', 'blocks.3.mlp', ...]`; a Swin's `layers.1.blocks.0`). Block k's output is
the last tensor made inside that block that a node outside it reads (the residual sum the next block, a
patch merging or the final norm takes). Those tensors are added as graph outputs; nothing else changes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import onnx

from vitfold.errors import VitfoldError
from vitfold.export.blocks import BLOCK, block_order

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def _block_of(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            for scope in ast.literal_eval(prop.value):
                if BLOCK.match(scope):
                    return scope
    return None


def block_output_names(graph: onnx.GraphProto) -> dict[str, str]:
    """Block name -> its output tensor's name, in forward order."""
    block_of = [_block_of(n) for n in graph.node]
    producer_block = {out: b for n, b in zip(graph.node, block_of, strict=True) for out in n.output if b is not None}
    outputs: dict[str, str] = {}
    graph_outputs = {o.name for o in graph.output}
    for node, block in zip(graph.node, block_of, strict=True):
        for name in node.input:
            source = producer_block.get(name)
            if source is not None and source != block:
                outputs[source] = name  # later reads overwrite: the last crossing tensor wins
    for name in graph_outputs & producer_block.keys():
        outputs[producer_block[name]] = name
    if not outputs:
        raise VitfoldError("the ONNX graph carries no per-block scope metadata (not a vitfold dynamo export?)")
    return {block: outputs[block] for block in sorted(outputs, key=block_order)}


def with_block_outputs(path: Path) -> tuple[onnx.ModelProto, list[str]]:
    """The model at `path` with every block's output added as a graph output, and those names."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    names = list(block_output_names(model.graph).values())
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for name in names:
        elem_type = types.get(name, onnx.TensorProto.FLOAT)
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return model, names
