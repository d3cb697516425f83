"""safetensors files whose bytes depend only on their content.

`safetensors.torch.save` writes the header's metadata in hash-map order, so the same tensors and metadata
give other bytes in every process (and another sha256, which would rerun every stage downstream). Here
the header is written again with sorted keys; the tensor data, and so every offset, stay as they were.
"""

from __future__ import annotations

import json

import torch

HEADER_ALIGN = 8  # the format pads the JSON header with spaces to a multiple of 8 bytes


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialisation of `tensors` (contiguous CPU copies) with a sorted header."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % HEADER_ALIGN)
    return len(header).to_bytes(8, "little") + header + data[8 + size :]
