"""Expose each transformer block's output of an exported ONNX graph, to localise a divergence.

The dynamo exporter records each node's module path in the `pkg.torch.onnx.name_scopes` metadata
(e.g. `['', 'blocks', 'blocks.3', 'blocks.3.mlp', ...]`; a Swin's `layers.1.blocks.0`); the TorchScript-based
exporter (timm's `onnx_export`, `torch.onnx.export(dynamo=False)`) writes the same scopes into node names
(`/blocks/blocks.3/mlp/fc1/MatMul`). Block k's output is
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


NO_BLOCKS = "no block boundaries in this graph"


def _block_of(node: onnx.NodeProto) -> str | None:
    """The block scope a node was made in: from the dynamo exporter's metadata, else from its name."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            return next((scope for scope in ast.literal_eval(prop.value) if BLOCK.match(scope)), None)
    return next((part for part in node.name.split("/") if BLOCK.match(part)), None)


def block_output_names(graph: onnx.GraphProto) -> dict[str, str]:
    """Block name -> its output tensor's name, in forward order: of the tensors made inside the block that a
    node outside it reads, the one made last (the graph is topologically sorted). Not the one read last: an
    optimizer that shares a constant or a shape made in an early block with later blocks would otherwise make
    that constant the early block's "output", and a fault there would be named in a later block."""
    made_at = {}  # tensor -> (its block, the index of the node that makes it)
    for index, node in enumerate(graph.node):
        block = _block_of(node)
        if block is not None and node.op_type != "Constant":
            made_at |= {out: (block, index) for out in node.output}
    crossing: dict[str, tuple[int, str]] = {}
    reads = [(name, _block_of(node)) for node in graph.node for name in node.input]
    reads += [(o.name, None) for o in graph.output]
    for name, reader in reads:
        if name in made_at and made_at[name][0] != reader:
            block, index = made_at[name]
            crossing[block] = max(crossing.get(block, (-1, "")), (index, name))
    if not crossing:
        raise VitfoldError(f"{NO_BLOCKS} (its nodes carry no module scopes of timm's blocks)")
    return {block: crossing[block][1] for block in sorted(crossing, key=block_order)}


def with_block_outputs(path: Path) -> tuple[onnx.ModelProto, list[str]]:
    """The model at `path` with every block's output added as a graph output, and those names."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    names = list(block_output_names(model.graph).values())
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for name in names:
        elem_type = types.get(name, onnx.TensorProto.FLOAT)
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return model, names
