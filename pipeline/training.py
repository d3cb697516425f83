"""The training loop: a model and datasets in, a trained model and per-epoch metrics out. No files.

AdamW with weight decay grouped by each method's official rule (`AdapterMethod.no_weight_decay`); the
learning rate of every step from `train.schedule` (`vitfold.pipeline.schedules`). `train.precision`: the
autocast dtype (auto: bf16 on CUDA, fp32 on CPU); fp16 scales the loss with `torch.amp.GradScaler` as both
official loops do (a step whose gradients overflow is skipped and the scale halved). Optional Mixup/CutMix
with soft targets (`vitfold.pipeline.mixing`) and an EMA of the weights (timm `ModelEmaV3`), which is then
the model evaluated and the one whose adapter is folded (`Trainer.folded_model`). Batches are global:
batch b of an epoch is the same set of images whatever the number of processes, so a DDP run takes the
same steps as one process with the same global batch. `Trainer.state_dict()`
is everything a resumed run needs (adapter, optimizer, RNG, counters, history); where it is stored is
the caller's business (the train stage keeps it in RUN/train/last.ckpt).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from vitfold.errors import VitfoldError
from vitfold.pipeline.adapters import get_method
from vitfold.pipeline.adapting import adapter_record, adapter_state_dict, load_adapter, trainable_named_parameters
from vitfold.pipeline.config import TrainConfig
from vitfold.pipeline.mixing import Mixing, soft_target_loss
from vitfold.pipeline.schedules import learning_rates, steps_per_epoch

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

METRIC_FIELDS = (
    "epoch",
    "train_loss",
    "train_acc",
    "eval_loss",
    "eval_acc",
    "select_loss",
    "select_acc",
    "lr",
    "img_per_s",
    "seconds",
)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """One process, or DDP under torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise VitfoldError("no CUDA GPU is available", argument="device", value="cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return Dist(rank, world, torch.device("cuda", local) if use_cuda else torch.device("cpu"))


class GlobalBatchSampler(Sampler[list[int]]):
    """Seeded per-epoch permutation cut into global batches (the last partial one dropped when
    `drop_last`); each process takes its contiguous share of every global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, d: Dist, drop_last: bool = True) -> None:
        if batch_size % d.world:
            raise VitfoldError(f"batch size {batch_size} is not divisible by the {d.world} processes")
        if drop_last and n < batch_size:
            raise VitfoldError(f"the training split has {n} images, fewer than one batch of {batch_size}")
        if not drop_last and n % batch_size % d.world:
            raise VitfoldError(
                f"train.drop_last false: the last batch of {n % batch_size} images does not split over the "
                f"{d.world} processes (set train.drop_last true, or a batch size that divides {n})"
            )
        self.n, self.batch_size, self.seed, self.d, self.epoch = n, batch_size, seed, d, 0
        self.steps = steps_per_epoch(n, batch_size, drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for b in range(len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]  # the last one may be short
            share = len(batch) // self.d.world
            yield batch[self.d.rank * share : (self.d.rank + 1) * share]


def param_groups(model: nn.Module, weight_decay: float) -> list[tuple[float, list[tuple[str, nn.Parameter]]]]:
    """The trainable tensors as (weight decay, [(name, tensor)]) groups: decayed, then exempt by the method's
    own rule (`AdapterMethod.no_weight_decay`, reproducing each official code's groups); empty ones left out."""
    exempt = get_method(adapter_record(model).method).no_weight_decay
    decay, no_decay = [], []
    for name, p in trainable_named_parameters(model):
        (no_decay if exempt(name) else decay).append((name, p))
    return [(wd, named) for wd, named in ((weight_decay, decay), (0.0, no_decay)) if named]


def make_optimizer(model: nn.Module, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`."""
    groups = [{"params": [p for _, p in named], "weight_decay": wd} for wd, named in param_groups(model, weight_decay)]
    return torch.optim.AdamW(groups, lr=0.0)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.precision` on `device` (None: fp32, no autocast); auto is bf16 on CUDA,
    fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return AUTOCAST[precision]


def _rng_state() -> dict[str, Any]:
    import numpy as np

    _, keys, pos, has_gauss, cached = np.random.get_state()  # ("MT19937", keys, ...): tensors and numbers only
    numpy_state = {"keys": torch.from_numpy(keys.copy()), "pos": pos, "has_gauss": has_gauss, "cached": cached}
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:  # timm's Mixup draws from numpy
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, d: Dist, dtype: torch.dtype | None) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy over the whole split (autocast to `dtype` unless None)."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with torch.autocast(d.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        count += len(y)
    return loss_sum / count, correct / count


def _progress(iterable, total: int, desc: str, enabled: bool):
    """A per-epoch bar on an interactive terminal (rank 0); logs get one line per epoch instead."""
    from tqdm import tqdm

    shown = enabled and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not shown, dynamic_ncols=True)


EpochCallback = Callable[[dict[str, Any], bool], None]  # (the epoch's metrics row, the epoch to fold so far?)


class Trainer:
    """Fine-tunes an adapted model's trainable tensors on `train_set`, evaluating on `eval_set` (and, for
    `tc.select == "best-val"`, on `select_set`, whose best epoch is the one to fold; else the last one).

    Autocast per `tc.precision` (fp16 with a GradScaler); `tc.compile` wraps the step in `torch.compile`
    (the weights, adapter state and checkpoints stay those of `model`); with `tc.ema_decay` an EMA copy of
    the model is evaluated and is `folded_model`."""

    def __init__(
        self,
        model: nn.Module,
        tc: TrainConfig,
        d: Dist,
        train_set: Dataset,
        eval_set: Dataset,
        seed: int,
        select_set: Dataset | None = None,
    ) -> None:
        if (tc.select == "best-val") != (select_set is not None):
            raise VitfoldError("train.select best-val needs a validation split (and only best-val uses one)")
        self.model, self.tc, self.d = model, tc, d
        self.dtype = autocast_dtype(tc.precision, d.device)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.dtype == torch.float16)
        self.mixing = Mixing(tc, model.get_classifier().out_features) if Mixing.wanted(tc) else None
        self.ema = None
        if tc.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=tc.ema_decay)
        cuda = d.device.type == "cuda"
        self.sampler = GlobalBatchSampler(len(train_set), tc.batch_size, seed, d, tc.drop_last)
        self.loader = DataLoader(train_set, batch_sampler=self.sampler, num_workers=tc.num_workers, pin_memory=cuda)
        self.eval_loaders = {"eval": self._eval_loader(eval_set)}
        if select_set is not None:
            self.eval_loaders["select"] = self._eval_loader(select_set)
        net = nn.parallel.DistributedDataParallel(model) if d.world > 1 else model
        self.net = torch.compile(net) if tc.compile else net
        self.optimizer = make_optimizer(model, tc.weight_decay)
        self.lrs = learning_rates(tc, len(self.sampler))
        self.epoch, self.step, self.best_acc, self.best_select = 0, 0, -1.0, -1.0
        self.history: list[dict[str, Any]] = []

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset, batch_size=max(1, self.tc.batch_size // self.d.world), num_workers=self.tc.num_workers
        )

    @property
    def folded_model(self) -> nn.Module:
        """The model whose adapter is saved and folded: the EMA of the weights when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        """Counters, metrics history, adapter and optimizer state and the RNG: all a resume needs."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_acc": self.best_acc,
            "best_select": self.best_select,
            "history": self.history,
            "adapter": adapter_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": adapter_state_dict(self.ema.module) if self.ema is not None else None,
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_adapter(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            load_adapter(self.ema.module, state["ema"])
        _set_rng_state(state["rng"])
        self.epoch, self.step, self.best_acc = state["epoch"], state["step"], state["best_acc"]
        self.best_select = state["best_select"]
        self.history = list(state["history"])

    def result(self) -> dict[str, Any]:
        """The last epoch's row, the best evaluation accuracy over epochs, and the epoch to fold."""
        selected = self.history[-1]
        if self.tc.select == "best-val":
            scored = [r for r in self.history if r["select_acc"] != ""]
            selected = max(scored, key=lambda r: r["select_acc"])  # the first of equals, as `fit` keeps it
        return {**self.history[-1], "best_acc": self.best_acc, "selected": selected}

    def fit(self, on_epoch: EpochCallback | None = None, eval_name: str = "eval", log=print) -> dict[str, Any]:
        """Train from `self.epoch` to `tc.total_epochs`; returns `self.result()`."""
        tc, d = self.tc, self.d
        for epoch in range(self.epoch, tc.total_epochs):
            row = self._train_epoch(epoch)
            if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.total_epochs:
                for split, loader in self.eval_loaders.items():
                    loss, acc = evaluate(self.folded_model, loader, d, self.dtype)
                    row.update({f"{split}_loss": round(loss, 6), f"{split}_acc": round(acc, 6)})
            if row["eval_acc"] != "" and row["eval_acc"] > self.best_acc:
                self.best_acc = row["eval_acc"]
            chosen = tc.select == "last" or (row["select_acc"] != "" and row["select_acc"] > self.best_select)
            if tc.select == "best-val" and chosen:
                self.best_select = row["select_acc"]
            self.history.append(row)
            self.epoch = epoch + 1
            if on_epoch is not None:
                on_epoch(row, chosen)
            if d.main:
                log(
                    f"epoch {epoch + 1}/{tc.total_epochs}: train loss {row['train_loss']:.4f} "
                    f"acc {row['train_acc']:.3f}"
                    + (f", {eval_name} acc {row['eval_acc']:.3f}" if row["eval_acc"] != "" else "")
                    + (f", val acc {row['select_acc']:.3f}" if row["select_acc"] != "" else "")
                    + f", {row['img_per_s']:.0f} img/s"
                )
        return self.result()

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        tc, d = self.tc, self.d
        self.sampler.set_epoch(epoch)
        self.net.train()
        loss_sum, correct, seen, started, lr = 0.0, 0, 0, time.perf_counter(), 0.0
        bar = _progress(self.loader, len(self.sampler), f"epoch {epoch + 1}/{tc.total_epochs}", d.main)
        for x, y in bar:
            lr = self.lrs[self.step]
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            inputs, targets = self.mixing(x, y) if self.mixing is not None else (x, y)
            with torch.autocast(d.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                logits = self.net(inputs)
                if self.mixing is not None:
                    loss = soft_target_loss(logits.float(), targets)
                else:
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=tc.label_smoothing)
            value = loss.item()
            if not math.isfinite(value):  # stop before a NaN step reaches the adapter
                raise VitfoldError(
                    f"training diverged: loss {value} at epoch {epoch + 1}, step {self.step + 1} (lr {lr:.3g}); "
                    "lower the learning rate or check the data and the adapter options"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # fp16: the scaled loss; else the loss itself
            self.scaler.step(self.optimizer)  # fp16: skipped when a gradient is inf/NaN
            self.scaler.update()  # fp16: halve the scale after an overflow, grow it after 2000 clean steps
            if self.ema is not None:
                self.ema.update(self.model)
            self.step += 1
            loss_sum += value * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
            rate = seen * d.world / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}")
        seconds = time.perf_counter() - started
        return {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / seen, 6),
            "train_acc": round(correct / seen, 6),
            **{f"{split}_{kind}": "" for split in ("eval", "select") for kind in ("loss", "acc")},
            "lr": lr,
            "img_per_s": round(seen * d.world / seconds, 2),
            "seconds": round(seconds, 3),
        }
