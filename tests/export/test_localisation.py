"""Localisation names the block a fault was planted in, at every block position, in PyTorch and in ONNX; a graph
without block scopes says so in plain words."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from vitfold.errors import VitfoldError
from vitfold.export import export, open_runner
from vitfold.export.gate import localise
from vitfold.export.onnx_blocks import block_output_names

from helpers import images, make_vit

DEPTH = 4


@pytest.fixture(scope="module")
def deep_vit() -> torch.nn.Module:
    return make_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=DEPTH)


def _with_fault(model: torch.nn.Module, block: int) -> torch.nn.Module:
    """A copy with one small weight of block `block` changed (small: its own output moves little, later
    blocks carry the change on)."""
    faulty = copy.deepcopy(model)
    with torch.no_grad():
        faulty.blocks[block].attn.proj.weight[3, 5] += 0.05
    return faulty


@pytest.mark.parametrize("block", range(DEPTH))
def test_a_fault_is_named_at_its_own_block_in_torch_and_onnx(deep_vit, tmp_path, block):
    faulty = _with_fault(deep_vit, block)
    x = images(deep_vit, 4)
    with open_runner("torch", deep_vit) as reference, open_runner("torch", faulty) as runner:
        assert localise(runner, reference, x, "fp32")["where"] == f"blocks.{block}"
    files = export(faulty, tmp_path, formats=("onnx",), input_size=(3, 32, 32))
    with open_runner("torch", deep_vit) as reference, open_runner("onnxruntime", files["onnx"]) as runner:
        assert localise(runner, reference, x, "fp32")["where"] == f"blocks.{block}"


def test_a_graph_without_block_scopes_says_no_block_boundaries():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="/head/Relu")], "g", [x], [y])
    with pytest.raises(VitfoldError, match="no block boundaries in this graph"):
        block_output_names(onnx.helper.make_model(graph).graph)


def test_a_constant_an_early_block_shares_with_later_ones_is_not_its_output():
    """An optimizer may share one shape constant (made in blocks.0) with later blocks: blocks.0's output is still
    its residual sum, the last tensor it makes that another block reads."""
    t = helper.make_tensor_value_info
    nodes = [
        helper.make_node("Shape", ["x"], ["shape0"], name="/blocks/blocks.0/Shape"),
        helper.make_node("Relu", ["x"], ["a0"], name="/blocks/blocks.0/Relu"),
        helper.make_node("Add", ["x", "a0"], ["out0"], name="/blocks/blocks.0/Add"),
        helper.make_node("Relu", ["out0"], ["a1"], name="/blocks/blocks.1/Relu"),
        helper.make_node("Add", ["out0", "a1"], ["s1"], name="/blocks/blocks.1/Add"),
        helper.make_node("Reshape", ["s1", "shape0"], ["out1"], name="/blocks/blocks.1/Reshape"),
        helper.make_node("Relu", ["out1"], ["y"], name="/head/Relu"),
    ]
    graph = helper.make_graph(nodes, "g", [t("x", TensorProto.FLOAT, [2, 4])], [t("y", TensorProto.FLOAT, [2, 4])])
    assert block_output_names(graph) == {"blocks.0": "out0", "blocks.1": "out1"}
