"""EFFT: tensor-train factors shared across all blocks, with one core slice per layer (the paper's
per-layer cores, EFFT paper §3.2, not the released code's single shared core).

In x·W orientation (W[in, out]), L blocks, rank r, fixed scale s, added to the frozen weights W' = W + ΔW:

EFFT2 (attention and FFN apart), U1 ∈ R^{d×r}, V1 ∈ R^{r×d}, C1 ∈ R^{r×r×4L}, U2 ∈ R^{d×r}, V2 ∈ R^{r×h},
C2 ∈ R^{r×r×2L} (h = MLP hidden width, 4d in ViTs):

    ΔW_{q,k,v,o}[l] = s · U1 C1[:, :, 4l+j] V1        (j = 0..3)
    ΔW_fc1[l] = s · U2 C2[:, :, 2l] V2                 (d×h)
    ΔW_fc2[l] = (s · U2 C2[:, :, 2l+1] V2)ᵀ            (h×d)

EFFT1 (one core over three 4d×d slabs per block), U ∈ R^{4d×r}, V ∈ R^{d×r}, Σ ∈ R^{3L×r×r}:

    slab[l, i] = s · U Σ[3l+i] Vᵀ,   slab[l, 0] = [ΔW_q; ΔW_k; ΔW_v; ΔW_o],  slab[l, 1] = ΔW_fc1ᵀ,
                                     slab[l, 2] = ΔW_fc2

Hierarchical backbones (Swin): one factor set per stage (the widths differ), each over the stage's L
blocks, held by the stage (`layers.i.efft`); the ranks double from stage to stage, `rank` being the last
stage's (Swin-B attention 4/8/16/32 at rank 32). EFFT2's FFN may take ranks of its own: U2 ∈ R^{d×r1},
C2 ∈ R^{r1×r2×2L}, V2 ∈ R^{r2×h} (`ffn_rank` r1 and `ffn_rank2` r2, both = `rank` by default, the paper's
r1 = r2). `core=shared` replaces the per-layer core slices by one set (4 + 2 slices for EFFT2, 3 for EFFT1)
that every block of a stage uses, as the released code does (its Swin code also has r2 = 2·r1).

q, k, v are the three row blocks of timm's fused `attn.qkv` (nn.Linear holds Wᵀ). `targets` (the EFFT
paper's Table 4 ablation) adapts all of them, the attention alone (q, k, v, o: EFFT2 keeps U1, V1, C1;
EFFT1 one core slice per block, slab 0) or the FFN alone (fc1, fc2: EFFT2 keeps U2, V2, C2; EFFT1 two core
slices per block, slabs 1 and 2, so Σ[2l+i]); the other layers stay the base's. Only the factors (and a
new head) train. `init` names the factor that starts at zero ("u" or "v"; EFFT2 one letter for the
attention factors and one for the FFN factors, e.g. "vu"); the others are Xavier-uniform, so the adapted
model equals the base at step 0. Dropout acts on the factor tensors U, C, V themselves, in training only.
EFFT2's cores are drawn in the released code's layout, so their initial spread is the released one: on a
ViT [r, r, k] (the stored shape; bound √(6 / (2·r·k))), on a Swin [k, r1, r2], then the slice axis is
moved last (bound √(6 / (r1·r2 + k·r2)); Swin-B's last stage: 0.072 attention, 0.10 FFN).

Dropout masks follow the official code, where each layer's forward applies its own `nn.Dropout`: per
block one mask on the attention factors (shared by q, k, v, o), and separate masks for the fc1 and fc2
deltas (EFFT1: one per slab); the factors are expanded to one copy per block (and layer) first.

Cost: the factors are stored once per stage (`model.efft` in a ViT). At the start of every forward of the
stage (a pre-hook on the model, or on the Swin stage) all its 6L deltas are built in one batched product
(no factor product recomputed per layer; the per-block copies cost about L·d·r elements), and each layer
adds its delta to its weight and runs one matmul (F.linear(x, W + ΔW)), so the step costs about what full
fine-tuning's does. The fold builds each block's deltas from its own core slices, in float64.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitfold.errors import AdapterError
from vitfold.pipeline.adapters.base import AdapterMethod, AdapterModule, AdditiveLinear, check_rank, is_number
from vitfold.pipeline.adapters.targets import Stage, find_targets

TARGETS = {"all": ("attn", "fc1", "fc2"), "attention": ("attn",), "ffn": ("fc1", "fc2")}  # deltas per option
LAYERS = {"attn": ("attn.qkv", "attn.proj"), "fc1": ("mlp.fc1",), "fc2": ("mlp.fc2",)}  # the layers of a delta
CORES = ("layer", "shared")  # per-layer core slices (the paper), or one set every block uses (released code)


def stage_rank(rank: int, halvings: int, option: str, method: str) -> int:
    """The rank of a stage `halvings` stages before the last: rank / 2^halvings (ranks double per stage)."""
    if rank % 2**halvings:
        raise AdapterError(
            f"option '{option}' ({rank}) is the last stage's rank and must be divisible by {2**halvings} "
            f"for method '{method}' (ranks double from stage to stage)"
        )
    return rank // 2**halvings


@dataclass(frozen=True)
class EFFTOptions:
    """rank r (a hierarchical backbone's last stage's), fixed scale s, dropout p on the factors, `init`
    (which factor starts at zero), `targets` (all | attention | ffn: which layers get deltas) and `core`
    (layer | shared: per-layer core slices, or one set shared by the blocks of a stage)."""

    rank: int = 16
    scale: float = 1.0
    dropout: float = 0.1
    init: str = "v"
    targets: str = "all"
    core: str = "layer"

    init_letters = 1  # EFFT2: attention + FFN

    @property
    def method(self) -> str:
        return "efft2" if self.init_letters == 2 else "efft1"

    def _check_rank(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AdapterError(f"option '{name}' must be a positive integer for method '{self.method}', got {value!r}")

    def __post_init__(self) -> None:
        method = self.method
        self._check_rank("rank")
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise AdapterError(f"option 'dropout' must be in [0, 1) for method '{method}', got {self.dropout!r}")
        if not is_number(self.scale):
            raise AdapterError(f"option 'scale' must be a finite number for method '{method}', got {self.scale!r}")
        if not isinstance(self.init, str) or len(self.init) != self.init_letters or set(self.init) - {"u", "v"}:
            example = "'vv' or 'vu'" if self.init_letters == 2 else "'u' or 'v'"
            raise AdapterError(f"option 'init' must be {example} for method '{method}', got '{self.init}'")
        if self.targets not in TARGETS:
            choices = " | ".join(TARGETS)
            raise AdapterError(f"option 'targets' must be {choices} for method '{method}', got {self.targets!r}")
        if self.core not in CORES:
            raise AdapterError(f"option 'core' must be {' | '.join(CORES)} for method '{method}', got {self.core!r}")


@dataclass(frozen=True)
class EFFT2Options(EFFTOptions):
    """EFFTOptions, plus the FFN's ranks: `ffn_rank` r1 (U2's) and `ffn_rank2` r2 (V2's); None: r1 = `rank`,
    r2 = r1."""

    init: str = "vv"
    ffn_rank: int | None = None
    ffn_rank2: int | None = None
    init_letters = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("ffn_rank", "ffn_rank2"):
            if getattr(self, name) is not None:
                self._check_rank(name)


class SharedFactors(AdapterModule):
    """Factors shared by all blocks; builds the per-layer deltas, in nn.Linear orientation [out, in]."""

    def __init__(self, opts: EFFTOptions, depth: int) -> None:
        super().__init__()
        self.scale = float(opts.scale)
        self.dropout = opts.dropout
        self.kinds = TARGETS[opts.targets]  # the deltas built: attn, fc1, fc2 (or some of them)
        self.depth = depth
        self.shared_core = opts.core == "shared"
        self.core_sets = 1 if self.shared_core else depth  # core slice sets: one per block, or one for all
        self._deltas: dict[str, tuple[torch.Tensor, ...]] | None = None  # this forward's, per block
        self._folded = False  # set by `fuse`: the layers hold the deltas now, `build` has nothing to do

    def _factor(
        self, name: str, dtype: torch.dtype | None, dropout: bool, copies: tuple[int, ...] = ()
    ) -> torch.Tensor:
        """Factor `name` (in `dtype`), with leading axes `copies`: one copy per layer that the official code
        gives a dropout of its own. In training each copy draws its own mask; otherwise they are views."""
        t = getattr(self, name) if dtype is None else getattr(self, name).to(dtype)
        t = t.expand(*copies, *t.shape)  # [*copies, *factor], no copy made
        return F.dropout(t, self.dropout, training=True) if dropout else t

    def _core_slices(
        self, name: str, dtype: torch.dtype | None, dropout: bool, axis: int, start: int, stop: int
    ) -> torch.Tensor:
        """The core slices of blocks start..stop, stacked block-major on `axis` (k per block: [.., n·k, ..]).

        Per-layer cores: the blocks' own slices. A shared core: its k slices once per block, each copy with
        its own dropout mask (the released code's per-layer dropout on the one core)."""
        n = stop - start
        if not self.shared_core:
            k = getattr(self, name).shape[axis] // self.depth
            return self._factor(name, dtype, dropout).narrow(axis, k * start, k * n)
        copies = self._factor(name, dtype, dropout, (n,))  # [n, *core]
        return copies.movedim(0, axis).flatten(axis, axis + 1)  # [.., n, k, ..] -> [.., n·k, ..]

    @abstractmethod
    def stacked_deltas(self, blocks: slice, dtype: torch.dtype | None, dropout: bool) -> dict[str, torch.Tensor]:
        """Contiguous nn.Linear-orientation deltas of `blocks` (n of them), for each kind in `self.kinds`:
        "attn" [n, 4, d, d] (q, k, v, o; each [out, in]), "fc1" [n, h, d], "fc2" [n, d, h]."""

    def linear_deltas(
        self, blocks: slice = slice(None), dtype: torch.dtype | None = None, dropout: bool = False
    ) -> dict[str, tuple[torch.Tensor, ...]]:
        """Deltas of `blocks`: layer name -> one [out, in] tensor per block (the targeted layers only).

        Split with unbind/split only, so each layer's backward writes its own slice into one stack
        instead of zero-filling a full-size gradient per layer."""
        stacked = self.stacked_deltas(blocks, dtype, dropout)
        deltas = {f"mlp.{kind}": stacked[kind].unbind(0) for kind in ("fc1", "fc2") if kind in stacked}
        if "attn" in stacked:
            d = stacked["attn"].shape[-1]
            qkv, proj = [], []
            for block in stacked["attn"].unbind(0):  # [4, d, d]
                q_k_v, o = block.split([3, 1])
                qkv.append(q_k_v.reshape(3 * d, d))  # [3, d, d] -> [3d, d], a view
                proj.append(o.squeeze(0))
            deltas.update({"attn.qkv": tuple(qkv), "attn.proj": tuple(proj)})
        return deltas

    def _dropout_now(self) -> bool:
        return self.training and self.dropout > 0

    def build(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: build every layer's delta once for this forward."""
        if not self._folded:
            self._deltas = self.linear_deltas(dropout=self._dropout_now())

    def release(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Forward hook: drop this forward's deltas (autograd keeps what backward needs)."""
        self._deltas = None

    def delta(self, layer: str, block: int) -> torch.Tensor:
        """The delta of `layer` in `block` for the current forward (built alone if called outside one)."""
        if self._deltas is not None:
            return self._deltas[layer][block]
        return self.linear_deltas(slice(block, block + 1), dropout=self._dropout_now())[layer][0]

    def fuse(self) -> nn.Module:
        """What timm's reparameterize_model leaves in place of the factors (the layers hold the deltas)."""
        self._folded = True
        return nn.Identity()


def _xavier_then_zero(tensors: dict[str, nn.Parameter], zero: str, slices_first: tuple[str, ...] = ()) -> None:
    """Zero `zero`, Xavier-uniform the others. A core named in `slices_first` is drawn as [k, r1, r2] (its
    slice axis first, as the released Swin code lays it out) and stored as [r1, r2, k]: the bound
    √(6 / (fan_in + fan_out)) is then the released one, fan_in = r1·r2 and fan_out = k·r2, instead of
    fan_in = r2·k and fan_out = r1·k on the stored shape (the released ViT layout)."""
    for name, t in tensors.items():
        if name == zero:
            nn.init.zeros_(t)
        elif name in slices_first:
            drawn = nn.init.xavier_uniform_(torch.empty(t.shape[-1], *t.shape[:-1], device=t.device, dtype=t.dtype))
            with torch.no_grad():
                t.copy_(drawn.movedim(0, -1))  # [k, r1, r2] -> [r1, r2, k]
        else:
            nn.init.xavier_uniform_(t)


class EFFT2Factors(SharedFactors):
    """U1 [d, r], V1 [r, d], C1 [r, r, 4S] (attention); U2 [d, r1], V2 [r2, h], C2 [r1, r2, 2S] (FFN), with S
    core sets (L per-layer, or 1 shared)."""

    def __init__(
        self,
        d: int,
        h: int,
        depth: int,
        ranks: tuple[int, int, int],
        opts: EFFTOptions,
        like: torch.Tensor,
        slices_first: bool = False,
    ) -> None:
        super().__init__(opts, depth)
        cores = ("C1", "C2") if slices_first else ()  # drawn in the released Swin layout [k, r1, r2]
        (r, r1, r2), sets, kw = ranks, self.core_sets, {"device": like.device, "dtype": like.dtype}
        if "attn" in self.kinds:
            self.U1, self.V1 = nn.Parameter(torch.empty(d, r, **kw)), nn.Parameter(torch.empty(r, d, **kw))
            self.C1 = nn.Parameter(torch.empty(r, r, 4 * sets, **kw))
        if "fc1" in self.kinds:
            self.U2, self.V2 = nn.Parameter(torch.empty(d, r1, **kw)), nn.Parameter(torch.empty(r2, h, **kw))
            self.C2 = nn.Parameter(torch.empty(r1, r2, 2 * sets, **kw))
        if "attn" in self.kinds:
            _xavier_then_zero(
                {"U1": self.U1, "C1": self.C1, "V1": self.V1}, zero=opts.init[0].upper() + "1", slices_first=cores
            )
        if "fc1" in self.kinds:
            _xavier_then_zero(
                {"U2": self.U2, "C2": self.C2, "V2": self.V2}, zero=opts.init[1].upper() + "2", slices_first=cores
            )

    def stacked_deltas(self, blocks, dtype, dropout):
        start, stop, _ = blocks.indices(self.depth)
        n, out = stop - start, {}
        # the official masks: per block one for the attention factors (shared by q, k, v, o), and separate
        # ones for the fc1 and the fc2 delta of each MLP
        if "attn" in self.kinds:
            u1, v1 = self._factor("U1", dtype, dropout, (n,)), self._factor("V1", dtype, dropout, (n,))  # [n, d|r, ·]
        if "fc1" in self.kinds:
            u2, v2 = self._factor("U2", dtype, dropout, (2, n)), self._factor("V2", dtype, dropout, (2, n))
        if "attn" in self.kinds:
            r = self.C1.shape[0]
            c1 = self._core_slices("C1", dtype, dropout, 2, start, stop).reshape(r, r, n, 4)  # [r, r, n, 4]
            # (s U C V)ᵀ = s Vᵀ Cᵀ Uᵀ: q, k, v, o and fc1 are the transposes of their x·W deltas
            vc1 = torch.einsum("bsj,rsbk->bkjr", v1, c1)  # [n, 4, d, r]
            out["attn"] = self.scale * vc1 @ u1.transpose(-1, -2).unsqueeze(1)  # [n, 4, d, r] @ [n, 1, r, d]
        if "fc1" in self.kinds:
            c2 = self._core_slices("C2", dtype, dropout, 2, start, stop)  # [r1, r2, 2n]
            vc2 = torch.einsum("bsj,rsb->bjr", v2[0], c2[:, :, 0::2])  # [n, h, r1]
            out["fc1"] = self.scale * vc2 @ u2[0].transpose(-1, -2)  # [n, h, r1] @ [n, r1, d] -> [n, h, d]
            uc2 = torch.einsum("bir,rsb->bis", u2[1], c2[:, :, 1::2])  # [n, d, r2]
            out["fc2"] = self.scale * uc2 @ v2[1]  # [n, d, r2] @ [n, r2, h] -> [n, d, h]
        return out


class EFFT1Factors(SharedFactors):
    """U [4d, r], V [d, r], core Σ [kS, r, r] for the k targeted slabs of each block (3: all), with S core
    sets (L per-layer, or 1 shared); the MLP must be 4d wide (the slabs are 4d×d)."""

    def __init__(self, d: int, depth: int, rank: int, opts: EFFTOptions, like: torch.Tensor) -> None:
        super().__init__(opts, depth)
        r, kw = rank, {"device": like.device, "dtype": like.dtype}
        self.U = nn.Parameter(torch.empty(4 * d, r, **kw))
        self.V = nn.Parameter(torch.empty(d, r, **kw))
        self.core = nn.Parameter(torch.empty(len(self.kinds) * self.core_sets, r, r, **kw))
        _xavier_then_zero({"U": self.U, "core": self.core, "V": self.V}, zero=opts.init.upper())

    def stacked_deltas(self, blocks, dtype, dropout):
        start, stop, _ = blocks.indices(self.depth)
        k, n, (d, r) = len(self.kinds), stop - start, self.V.shape
        # per block, one mask per slab (attention, fc1, fc2), as each layer's own dropout draws it
        u, v = self._factor("U", dtype, dropout, (k, n)), self._factor("V", dtype, dropout, (k, n))  # [k, n, ·, r]
        core = self._core_slices("core", dtype, dropout, 0, start, stop).view(n, k, r, r)
        out = {}
        for i, kind in enumerate(self.kinds):
            if kind == "attn":
                # slab 0 = s U Σ Vᵀ stacks the x·W deltas of q, k, v, o on its input axis: part p is
                # s U_p Σ Vᵀ, whose nn.Linear form is s V Σᵀ U_pᵀ
                v_core = self.scale * v[i] @ core[:, i].transpose(-1, -2)  # [n, d, r] @ [n, r, r] -> [n, d, r]
                u_parts = u[i].reshape(n, 4, d, r).transpose(-1, -2)  # [n, 4, r, d]
                out[kind] = v_core.unsqueeze(1) @ u_parts  # [n, 1, d, r] @ [n, 4, r, d] -> [n, 4, d, d]
            elif kind == "fc1":
                out[kind] = self.scale * (u[i] @ core[:, i]) @ v[i].transpose(-1, -2)  # slab 1 = ΔW_fc1ᵀ: [n, 4d, d]
            else:
                out[kind] = self.scale * (v[i] @ core[:, i].transpose(-1, -2)) @ u[i].transpose(-1, -2)  # slab 2ᵀ
        return out


class DeltaLinear(AdditiveLinear):
    """W' = W + ΔW[block] with ΔW from the shared factors; b unchanged. Folds to W + ΔW (float64)."""

    def __init__(self, base: nn.Linear, factors: SharedFactors, layer: str, block: int) -> None:
        super().__init__(base)
        object.__setattr__(self, "factors", factors)  # a reference, not a submodule: stored once, on the model
        self.layer, self.block = layer, block

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if dtype is None:
            return self.factors.delta(self.layer, self.block)
        (delta,) = self.factors.linear_deltas(slice(self.block, self.block + 1), dtype=dtype)[self.layer]
        return delta

    def extra_repr(self) -> str:
        return f"layer={self.layer}, block={self.block}"


class _EFFT(AdapterMethod):
    @classmethod
    def head_init(cls, family: str) -> str:
        """The official code keeps timm's random init of the new head (`reset_classifier`)."""
        return "timm"

    @classmethod
    def no_weight_decay(cls, name: str) -> bool:
        """None: the official EFFT decays every trainable tensor, the head bias included."""
        return False

    @abstractmethod
    def make_factors(self, stage: Stage, halvings: int, like: torch.Tensor, family: str) -> SharedFactors:
        """The method's factors for one stage of a `family` model, whose ranks are the last stage's halved
        `halvings` times."""

    def attach(self, model: nn.Module) -> None:
        layers = [layer for kind in TARGETS[self.options.targets] for layer in LAYERS[kind]]
        targets = find_targets(model, shifts=False)
        stages = targets.stages
        for index, stage in enumerate(stages):
            d, h = stage.width, stage.hidden
            expected = {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (h, d), "mlp.fc2": (d, h)}
            for block in stage.blocks:
                for layer in layers:
                    shape = tuple(model.get_submodule(f"{block}.{layer}").weight.shape)
                    if shape != expected[layer]:
                        raise AdapterError(
                            f"layer '{block}.{layer}' has weight shape {shape}; {self.name} shares factors across "
                            f"the blocks of a stage and needs {expected[layer]} in every block"
                        )
            like = model.get_submodule(f"{stage.blocks[0]}.attn.qkv").weight
            factors = self.make_factors(stage, len(stages) - 1 - index, like, targets.family)
            host = model.get_submodule(stage.host)
            host.efft = factors
            for b, block in enumerate(stage.blocks):
                for layer in layers:
                    name = f"{block}.{layer}"
                    model.set_submodule(name, DeltaLinear(model.get_submodule(name), factors, layer, b))
            factors.hooks = [
                host.register_forward_pre_hook(factors.build),
                host.register_forward_hook(factors.release),
            ]


class EFFT1(_EFFT):
    """EFFT1: one U, V and a 3L-slice core over the [q; k; v; o], fc1ᵀ and fc2 slabs of every block."""

    name = "efft1"
    options_type = EFFTOptions

    def make_factors(self, stage, halvings, like, family):
        if stage.hidden != 4 * stage.width:
            raise AdapterError(
                f"layer '{stage.blocks[0]}.mlp.fc1' is {stage.hidden} wide; efft1's 4d×d slabs need an MLP of "
                f"4·{stage.width}"
            )
        rank = stage_rank(self.options.rank, halvings, "rank", self.name)
        check_rank(rank, stage.width, "rank", self.name, f"{stage.blocks[0]}.attn.qkv")  # V [d, r]
        return EFFT1Factors(stage.width, len(stage.blocks), rank, self.options, like=like)


class EFFT2(_EFFT):
    """EFFT2: attention factors U1, V1, C1 and FFN factors U2, V2, C2."""

    name = "efft2"
    options_type = EFFT2Options

    def make_factors(self, stage, halvings, like, family):
        o = self.options
        r1 = o.ffn_rank if o.ffn_rank is not None else o.rank
        r2 = o.ffn_rank2 if o.ffn_rank2 is not None else r1
        named = {"rank": o.rank, "ffn_rank": r1, "ffn_rank2": r2}
        ranks = tuple(stage_rank(value, halvings, option, self.name) for option, value in named.items())
        # U1 [d, r], U2 [d, r1], V2 [r2, h]: each rank at most the side it factors
        limits = {
            "rank": (stage.width, "attn.qkv"),
            "ffn_rank": (stage.width, "mlp.fc1"),
            "ffn_rank2": (stage.hidden, "mlp.fc2"),
        }
        for (option, (limit, layer)), rank in zip(limits.items(), ranks, strict=True):
            check_rank(rank, limit, option, self.name, f"{stage.blocks[0]}.{layer}")
        slices_first = family == "swin"  # the released Swin code's core layout; its ViT code's is [r, r, k]
        return EFFT2Factors(
            stage.width, stage.hidden, len(stage.blocks), ranks, o, like=like, slices_first=slices_first
        )
