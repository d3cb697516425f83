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
    """W' = W ⊙ (1 + s_out s_inᵀ) (ViT: q, k, v rows each with their own s_in; Swin: one s_in), b' = b + f
    (no f: b' = b; no b: b' = f); the Table 6 ablations: `scales` left (s_in alone) / right (s_out alone)
    take the other scale as ones, `residual` false drops the 1. SSF: W' = W ⊙ γ per output channel,
    b' = b ⊙ γ + β."""
    scales, residual = options.get("scales", "both"), options.get("residual", True)
    out = {}
    rescaled = {k.rsplit(".", 1)[0] for k in sd if k.endswith((".s_in", ".s_out"))}
    for p in rescaled:
        w = sd.pop(f"{p}.base.weight")
        s_out = sd.pop(f"{p}.s_out") if scales in ("both", "right") else torch.ones(w.shape[0], dtype=w.dtype)
        s_in = sd.pop(f"{p}.s_in") if scales in ("both", "left") else torch.ones(1, w.shape[1], dtype=w.dtype)
        s_in_rows = s_in.repeat_interleave(w.shape[0] // s_in.shape[0], dim=0)  # [out, in]
        out[f"{p}.weight"] = w * (float(residual) + s_out[:, None] * s_in_rows)
        biases = [sd.pop(k) for k in (f"{p}.base.bias", f"{p}.f") if k in sd]
        if biases:
            out[f"{p}.bias"] = sum(biases)
    for key in [k for k in sd if k.endswith(".scale")]:
        p = key[: -len(".scale")]
        w, b, s, t = _pop(sd, p, ("base.weight", "base.bias", "scale", "shift"))
        out[f"{p}.weight"], out[f"{p}.bias"] = w * s.view(-1, *[1] * (w.dim() - 1)), b * s + t
    return {**sd, **out}


def _add_linear_deltas(sd: dict[str, Tensor], deltas: dict[tuple[str, str], Tensor]) -> dict[str, Tensor]:
    """deltas[(block name, layer)] in x·W orientation [in, out]; nn.Linear stores Wᵀ."""
    out = {}
    for (block, layer), delta in deltas.items():
        p = f"{block}.{layer}"
        out[f"{p}.weight"] = sd.pop(f"{p}.base.weight") + delta.T
        if f"{p}.base.bias" in sd:
            out[f"{p}.bias"] = sd.pop(f"{p}.base.bias")
    rest = {k: v for k, v in sd.items() if ".efft." not in f".{k}"}
    return {**rest, **out}


def _stages(sd: dict[str, Tensor]) -> list[tuple[str, list[str]]]:
    """(factor prefix, block names) per factor set: ("efft.", blocks.b) in a ViT, ("layers.i.efft.",
    layers.i.blocks.b) per Swin stage."""
    stages = []
    for host in sorted({k[: k.index("efft.")] for k in sd if f".{k}".count(".efft.")}):
        count = len({k[len(host) :].split(".")[1] for k in sd if k.startswith(f"{host}blocks.")})
        stages.append((f"{host}efft.", [f"{host}blocks.{b}" for b in range(count)]))
    return stages


def _slice(b: int, j: int, per_block: int, options: dict) -> int:
    """The core slice of block b's j-th delta: its own (per-layer cores) or the one shared set's."""
    return j if options.get("core", "layer") == "shared" else per_block * b + j


def efft2(sd: dict[str, Tensor], options: dict) -> dict[str, Tensor]:
    """ΔW_{q,k,v,o}[b] = s U1 C1[:, :, 4b+j] V1;  ΔW_fc1[b] = s U2 C2[:, :, 2b] V2;
    ΔW_fc2[b] = (s U2 C2[:, :, 2b+1] V2)ᵀ, per factor set (a Swin stage); a shared core: slices j, 2·0, 2·0+1;
    `targets` attention / ffn (EFFT Table 4): only those deltas."""
    s, targets = options["scale"], options.get("targets", "all")
    deltas = {}
    for prefix, blocks in _stages(sd):
        for b, block in enumerate(blocks):
            if targets in ("all", "attention"):
                u1, v1, c1 = (sd[f"{prefix}{n}"] for n in ("U1", "V1", "C1"))
                q, k, v, o = (s * u1 @ c1[:, :, _slice(b, j, 4, options)] @ v1 for j in range(4))
                deltas[block, "attn.qkv"] = torch.cat([q, k, v], dim=1)  # x·W: [d, 3d], output columns q | k | v
                deltas[block, "attn.proj"] = o
            if targets in ("all", "ffn"):
                u2, v2, c2 = (sd[f"{prefix}{n}"] for n in ("U2", "V2", "C2"))
                deltas[block, "mlp.fc1"] = s * u2 @ c2[:, :, _slice(b, 0, 2, options)] @ v2
                deltas[block, "mlp.fc2"] = (s * u2 @ c2[:, :, _slice(b, 1, 2, options)] @ v2).T
    return _add_linear_deltas(sd, deltas)


def efft1(sd: dict[str, Tensor], options: dict) -> dict[str, Tensor]:
    """slab[b, i] = s U Σ[3b+i] Vᵀ (4d×d): slab 0 = [ΔW_q; ΔW_k; ΔW_v; ΔW_o], slab 1 = ΔW_fc1ᵀ, slab 2 = ΔW_fc2,
    per factor set; `targets` attention: slab 0 alone, Σ[b]; ffn: slabs 1 and 2, Σ[2b], Σ[2b+1]."""
    s = options["scale"]
    slabs = {"all": (0, 1, 2), "attention": (0,), "ffn": (1, 2)}[options.get("targets", "all")]
    deltas = {}
    for prefix, blocks in _stages(sd):
        u, v, core = sd[f"{prefix}U"], sd[f"{prefix}V"], sd[f"{prefix}core"]
        d = v.shape[0]
        for b, block in enumerate(blocks):
            for position, slab in enumerate(slabs):
                delta = s * u @ core[_slice(b, position, len(slabs), options)] @ v.T
                if slab == 0:
                    q, k, vv, o = delta.split(d, dim=0)
                    deltas[block, "attn.qkv"] = torch.cat([q, k, vv], dim=1)
                    deltas[block, "attn.proj"] = o
                else:
                    deltas[block, "mlp.fc1" if slab == 1 else "mlp.fc2"] = delta.T if slab == 1 else delta
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
