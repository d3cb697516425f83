"""`load_checkpoint` reads a Google/JAX `.npz` ViT checkpoint exactly.

A tiny timm ViT with perturbed weights is written to `.npz` in the original JAX layout (the inverse of the
transposes and reshapes in timm's `vision_transformer._load_weights`), loaded into a differently seeded model,
and every state_dict tensor and the forward output must match. An `.npz` without the JAX keys must fail with
a `CheckpointError` naming the file.
"""

import re

import numpy as np
import pytest
import timm
import torch

from vitfold.errors import CheckpointError
from vitfold.pipeline.backbones import load_checkpoint


def _tiny_vit(seed):
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5
    )
    with torch.no_grad():  # move every tensor off its init (e.g. zero biases, unit LayerNorm scales)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _to_jax_npz(model, path):
    """Write `model` in the layout of the original ViT `.npz` checkpoints (Flax names, HWIO / [in, out])."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        q_k_v_w = np.split(sd[b + "attn.qkv.weight"], 3)  # each [out, in]
        q_k_v_b = np.split(sd[b + "attn.qkv.bias"], 3)
        for name, wt, bias in zip(("query", "key", "value"), q_k_v_w, q_k_v_b, strict=True):
            w[mha + f"{name}/kernel"] = wt.T.reshape(d, heads, d // heads)  # [d, heads, head_dim]
            w[mha + f"{name}/bias"] = bias.reshape(heads, d // heads)
        w[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(d, heads, d // heads).transpose(1, 2, 0)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[p + f"{ln}/scale"] = sd[b + f"{norm}.weight"]
            w[p + f"{ln}/bias"] = sd[b + f"{norm}.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in w.items()})


def test_npz_checkpoint_loads_every_tensor(tmp_path):
    a, b = _tiny_vit(0), _tiny_vit(1)
    path = tmp_path / "vit_tiny.npz"
    _to_jax_npz(a, path)
    sa = a.state_dict()
    assert all(not torch.equal(v, sa[k]) for k, v in b.state_dict().items())  # B starts different everywhere

    load_checkpoint(b, path)

    sb = b.state_dict()
    assert sb.keys() == sa.keys()
    for k, v in sa.items():
        torch.testing.assert_close(sb[k], v, atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arrays", [{}, {"unrelated/kernel": np.zeros((2, 2), np.float32)}], ids=["empty", "foreign"])
def test_npz_without_jax_keys_raises_checkpoint_error(tmp_path, arrays):
    path = tmp_path / "not_a_vit.npz"
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=re.escape(path.name)):
        load_checkpoint(_tiny_vit(0), path)
