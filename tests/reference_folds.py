"""Folds written out from the papers' formulas (RLRR paper §3.3, EFFT paper §3.2), apart from vitfold's fold code.

Each takes the adapted model's state_dict (float64) and the method's options as the test set them,
and returns the folded plain-timm state_dict.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _pop(sd: dict[str, Tensor], prefix: str, names: tuple[str, ...]) -> list[Tensor]:
    return [sd.pop(f"{prefix}.{n}") for n in names]


def rlrr(sd: dict[str, Tensor], options: dict) -> dict[str, Tensor]:
    """W' = W ⊙ (1 + s_out s_inᵀ) (q, k, v rows each with their own s_in), b' = b + f; the Table 6
    ablations: `scales` left (s_in alone) / right (s_out alone) take the other scale as ones, `residual`
    false drops the 1. SSF: W' = W ⊙ γ per output channel, b' = b ⊙ γ + β."""
    scales, residual = options.get("scales", "both"), options.get("residual", True)
    out = {}
    for key in [k for k in sd if k.endswith(".f")]:
        p = key[: -len(".f")]
        w, b, f = _pop(sd, p, ("base.weight", "base.bias", "f"))
        s_out = sd.pop(f"{p}.s_out") if scales in ("both", "right") else torch.ones(w.shape[0], dtype=w.dtype)
        s_in = sd.pop(f"{p}.s_in") if scales in ("both", "left") else torch.ones(1, w.shape[1], dtype=w.dtype)
        s_in_rows = s_in.repeat_interleave(w.shape[0] // s_in.shape[0], dim=0)  # [out, in]
        out[f"{p}.weight"], out[f"{p}.bias"] = w * (float(residual) + s_out[:, None] * s_in_rows), b + f
    for key in [k for k in sd if k.endswith(".scale")]:
        p = key[: -len(".scale")]
        w, b, s, t = _pop(sd, p, ("base.weight", "base.bias", "scale", "shift"))
        out[f"{p}.weight"], out[f"{p}.bias"] = w * s.view(-1, *[1] * (w.dim() - 1)), b * s + t
    return {**sd, **out}


def _add_linear_deltas(sd: dict[str, Tensor], deltas: dict[tuple[int, str], Tensor]) -> dict[str, Tensor]:
    """deltas[(block, layer)] in x·W orientation [in, out]; nn.Linear stores Wᵀ."""
    out = {}
    for key in [k for k in sd if k.endswith(".base.weight")]:
        p = key[: -len(".base.weight")]  # blocks.{l}.attn.qkv ...
        _, block, layer = p.split(".", 2)
        out[f"{p}.weight"] = sd.pop(key) + deltas[int(block), layer].T
        if f"{p}.base.bias" in sd:
            out[f"{p}.bias"] = sd.pop(f"{p}.base.bias")
    rest = {k: v for k, v in sd.items() if not k.startswith("efft.")}
    return {**rest, **out}


def _depth(sd: dict[str, Tensor]) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith("blocks.")})


def efft2(sd: dict[str, Tensor], options: dict) -> dict[str, Tensor]:
    """ΔW_{q,k,v,o}[b] = s U1 C1[:, :, 4b+j] V1;  ΔW_fc1[b] = s U2 C2[:, :, 2b] V2;
    ΔW_fc2[b] = (s U2 C2[:, :, 2b+1] V2)ᵀ; `targets` attention / ffn (EFFT Table 4): only those deltas."""
    s, targets = options["scale"], options.get("targets", "all")
    deltas = {}
    for b in range(_depth(sd)):
        if targets in ("all", "attention"):
            u1, v1, c1 = (sd[f"efft.{n}"] for n in ("U1", "V1", "C1"))
            q, k, v, o = (s * u1 @ c1[:, :, 4 * b + j] @ v1 for j in range(4))
            deltas[b, "attn.qkv"] = torch.cat([q, k, v], dim=1)  # x·W: [d, 3d], output columns q | k | v
            deltas[b, "attn.proj"] = o
        if targets in ("all", "ffn"):
            u2, v2, c2 = (sd[f"efft.{n}"] for n in ("U2", "V2", "C2"))
            deltas[b, "mlp.fc1"] = s * u2 @ c2[:, :, 2 * b] @ v2
            deltas[b, "mlp.fc2"] = (s * u2 @ c2[:, :, 2 * b + 1] @ v2).T
    return _add_linear_deltas(sd, deltas)


def efft1(sd: dict[str, Tensor], options: dict) -> dict[str, Tensor]:
    """slab[b, i] = s U Σ[3b+i] Vᵀ (4d×d): slab 0 = [ΔW_q; ΔW_k; ΔW_v; ΔW_o], slab 1 = ΔW_fc1ᵀ, slab 2 = ΔW_fc2;
    `targets` attention: slab 0 alone, Σ[b]; ffn: slabs 1 and 2, Σ[2b], Σ[2b+1]."""
    s = options["scale"]
    slabs = {"all": (0, 1, 2), "attention": (0,), "ffn": (1, 2)}[options.get("targets", "all")]
    u, v, core = sd["efft.U"], sd["efft.V"], sd["efft.core"]
    d = v.shape[0]
    deltas = {}
    for b in range(_depth(sd)):
        for position, slab in enumerate(slabs):
            delta = s * u @ core[len(slabs) * b + position] @ v.T
            if slab == 0:
                q, k, vv, o = delta.split(d, dim=0)
                deltas[b, "attn.qkv"] = torch.cat([q, k, vv], dim=1)
                deltas[b, "attn.proj"] = o
            else:
                deltas[b, "mlp.fc1" if slab == 1 else "mlp.fc2"] = delta.T if slab == 1 else delta
    return _add_linear_deltas(sd, deltas)


def lora(sd: dict[str, Tensor], options: dict) -> dict[str, Tensor]:
    """W' = W + (α / r) B A, α = r unless given."""
    r = options["rank"]
    scaling = options.get("alpha", r) / r
    out = {}
    for key in [k for k in sd if k.endswith(".A")]:
        p = key[: -len(".A")]
        a, b, w, bias = _pop(sd, p, ("A", "B", "base.weight", "base.bias"))
        out[f"{p}.weight"], out[f"{p}.bias"] = w + scaling * b @ a, bias
    return {**sd, **out}


def unchanged(sd: dict[str, Tensor], options: dict) -> dict[str, Tensor]:
    """Linear probe and full fine-tuning train the plain model's own tensors: nothing to fold."""
    return sd


REFERENCE_FOLDS = {"rlrr": rlrr, "efft1": efft1, "efft2": efft2, "lora": lora, "linear": unchanged, "full": unchanged}


def reference_fold(adapted: torch.nn.Module, method: str, options: dict) -> dict[str, Tensor]:
    sd = {k: v.detach().double() for k, v in adapted.state_dict().items()}
    return REFERENCE_FOLDS[method](sd, options)
