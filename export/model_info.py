"""What a deployment needs beside the weights: the preprocessing and the ordered class names.

    preprocessing   timm's data-config keys: input_size (C, H, W), interpolation, mean, std, crop_pct,
                    crop_mode (`timm.data.create_transform(**preprocessing)` rebuilds the evaluation transform)
    class_names     name i labels output (logit) i

`export` writes them into the ONNX files' `metadata_props` (each key one JSON value), the export stage
into export.json, and a Triton repository gets `labels.txt` (`labels_text`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vitfold.errors import VitfoldError

PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


@dataclass(frozen=True)
class ModelInfo:
    preprocessing: dict[str, Any]
    class_names: tuple[str, ...]

    @classmethod
    def from_timm_config(cls, config: dict[str, Any], where: str = "config.json") -> ModelInfo:
        """From a timm / Hugging Face `config.json` (its `pretrained_cfg` and `label_names`)."""
        pretrained = config.get("pretrained_cfg") or {}
        missing = [k for k in PREPROCESSING_KEYS if k not in pretrained]
        if missing or not isinstance(config.get("label_names"), list):
            absent = f"pretrained_cfg.{missing[0]}" if missing else "label_names"
            raise VitfoldError(f"{where} has no {absent}")
        return cls({k: pretrained[k] for k in PREPROCESSING_KEYS}, tuple(map(str, config["label_names"])))

    def check(self, input_size: tuple[int, ...], num_classes: int) -> None:
        """Refuse names or a size that do not describe a model of `input_size` with `num_classes` outputs."""
        if tuple(self.preprocessing["input_size"]) != tuple(input_size):
            raise VitfoldError(
                f"preprocessing input_size {tuple(self.preprocessing['input_size'])} is not the model's {input_size}"
            )
        if len(self.class_names) != num_classes:
            raise VitfoldError(f"{len(self.class_names)} class names for a model with {num_classes} outputs")
        bad = next((n for n in self.class_names if not n or "\n" in n or "\r" in n), None)
        if bad is not None:
            raise VitfoldError(f"class name {bad!r}: names must be non-empty and on one line")

    def to_dict(self) -> dict[str, Any]:
        """{"preprocessing": {...}, "class_names": [...]} (JSON-ready)."""
        return {"preprocessing": json.loads(json.dumps(self.preprocessing)), "class_names": list(self.class_names)}

    def metadata_props(self) -> dict[str, str]:
        """ONNX metadata: each preprocessing key and `class_names`, as a JSON value."""
        values = {**self.preprocessing, "class_names": list(self.class_names)}
        return {key: json.dumps(value) for key, value in values.items()}

    def labels_text(self) -> str:
        """Triton's label file: line i names output i."""
        return "".join(f"{name}\n" for name in self.class_names)
