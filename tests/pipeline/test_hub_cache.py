"""`--pretrained` follows the Hugging Face conventions: a warm cache is used with HF_HUB_OFFLINE=1 and no
network probe; offline with a cold cache is one line. A fake cache in the hub's own layout, no network."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from vitfold.errors import BackboneError
from vitfold.pipeline.backbones import create_backbone, hub_weights_cached

from helpers import make_vit, vitfold_cli

NAME, REPO = "test_vit", "timm/test_vit.r160_in1k"  # timm's smallest ViT with hub weights (0.37M)


def _warm_cache(cache: Path) -> dict[str, torch.Tensor]:
    """models--timm--test_vit.r160_in1k/{refs/main, snapshots/<commit>/model.safetensors}, as hf_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in make_vit(NAME, seed=7).state_dict().items()}
    save_file(weights, repo / "snapshots" / commit / "model.safetensors")
    return weights


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1 with an empty cache in tmp_path; any network connect fails the test."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError(f"network contacted: {args}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    return tmp_path


def test_offline_with_a_warm_cache_loads_the_cached_weights_without_probing(offline_hub):
    weights = _warm_cache(offline_hub)
    assert hub_weights_cached(NAME) and hub_weights_cached(f"{NAME}.r160_in1k")
    model = create_backbone(NAME, pretrained=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_offline_with_a_cold_cache_is_one_line(offline_hub):
    assert not hub_weights_cached(NAME)
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE is set and they are not in the Hugging Face cache") as e:
        create_backbone(NAME, pretrained=True)
    assert "\n" not in str(e.value) and "--checkpoint" in str(e.value)


def test_cli_with_hf_hub_offline_and_a_cold_cache_exits_2_with_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = vitfold_cli("train", "--backbone", NAME, "--pretrained", "--out", str(tmp_path / "run"), env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "HF_HUB_OFFLINE is set" in out.stderr
