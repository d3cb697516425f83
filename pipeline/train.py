"""The train stage: fine-tune a timm ViT with an adapter on a dataset, into RUN/train/.

Writes (rank 0 only, every file atomically):
    train/adapter.safetensors       adapter + head tensors of the best evaluated epoch, metadata inside
    train/adapter_last.safetensors  the same for the last epoch
    train/metrics.csv               one row per completed epoch
    train/last.ckpt                 what `--resume` needs: adapter, optimizer, step, RNG, history

AdamW with weight decay skipped for names containing "bias" or "norm" (the official RLRR rule); the
learning rate warms up linearly from `warmup_lr` to `lr`, then follows a cosine to `min_lr`, per step.
Batches are global: batch b of an epoch is the same set of images whatever the number of processes,
so a DDP run takes the same steps as one process with the same global batch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from pipeline.adapting import adapt, adapter_record, adapter_state_dict, load_adapter, trainable_named_parameters
from pipeline.backbones import create_backbone, load_checkpoint
from pipeline.config import RunConfig, training_params
from pipeline.data import ImageTransform, Splits, build_splits, parse_data_spec
from pipeline.errors import VitfoldError
from pipeline.manifest import record_stage
from pipeline.run import atomic_replace, atomic_write_text

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "img_per_s", "seconds")


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
        raise VitfoldError("--device cuda: no CUDA GPU is available")
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
    """Seeded per-epoch permutation cut into global batches (last partial batch dropped); each process
    takes its contiguous share of every global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, d: Dist) -> None:
        if batch_size % d.world:
            raise VitfoldError(f"batch size {batch_size} is not divisible by the {d.world} processes")
        if n < batch_size:
            raise VitfoldError(f"the training split has {n} images, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.d, self.epoch = n, batch_size, seed, d, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        share = self.batch_size // self.d.world
        for b in range(len(self)):
            start = b * self.batch_size + self.d.rank * share
            yield order[start : start + share]


def lr_at(step: int, total: int, steps_per_epoch: int, cfg) -> float:
    """Linear warm-up from warmup_lr to lr over warmup_epochs, then cosine down to min_lr."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, weight_decay: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in trainable_named_parameters(model):
        (no_decay if "bias" in name or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0)


def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """Backbone (random, --checkpoint or --pretrained weights) with the configured adapter and new head.

    Seeded from `cfg.seed` first, so a random backbone and the adapter's initial values are a function
    of the config: any stage can rebuild the same model."""
    torch.manual_seed(cfg.seed)
    kwargs = dict(cfg.backbone_kwargs)
    if cfg.train.drop_path is not None:
        kwargs.setdefault("drop_path_rate", cfg.train.drop_path)
    model = create_backbone(cfg.backbone, pretrained=cfg.pretrained, **kwargs)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    return adapt(model, cfg.method, num_classes=cfg.num_classes or num_classes, **cfg.method_options)


def data_transform(cfg: RunConfig, model: nn.Module) -> ImageTransform:
    pretrained = getattr(model, "pretrained_cfg", {}) or {}
    mean = cfg.train.mean or tuple(pretrained.get("mean", (0.5, 0.5, 0.5)))
    std = cfg.train.std or tuple(pretrained.get("std", (0.5, 0.5, 0.5)))
    return ImageTransform(tuple(model.patch_embed.img_size), mean, std, hflip=bool(cfg.train.hflip))


def input_transform(cfg: RunConfig) -> ImageTransform:
    """The backbone's input size and the run's normalisation."""
    probe = create_backbone(cfg.backbone, **cfg.backbone_kwargs)  # its input size and pretrained_cfg only
    return data_transform(cfg, probe)


def load_splits(cfg: RunConfig) -> Splits:
    """The configured dataset, transformed for the backbone's input size and normalisation."""
    return build_splits(parse_data_spec(cfg.data), input_transform(cfg))


def adapter_metadata(cfg: RunConfig, model: nn.Module, extra: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata (strings): method, options and backbone identity, so the file stands alone."""
    record = adapter_record(model)
    info = {
        "format": "vitfold-adapter/1",
        "method": record.method,
        "method_options": json.dumps(record.options),
        "backbone": cfg.backbone,
        "backbone_kwargs": json.dumps(cfg.backbone_kwargs),
        "num_classes": str(model.num_classes),
        "checkpoint": cfg.checkpoint or "",
        **{k: str(v) for k, v in extra.items()},
    }
    return info


def save_adapter(path: Path, model: nn.Module, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    atomic_replace(path, save(tensors, metadata=metadata))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, out.getvalue())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, d: Dist, amp: bool) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy over the whole split."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        count += len(y)
    return loss_sum / count, correct / count


def _tensorboard(log_dir: Path):
    """A SummaryWriter when TensorBoard is installed, else None (metrics.csv is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _progress(iterable, total: int, desc: str, enabled: bool):
    """A per-epoch bar on an interactive terminal (rank 0); logs get one line per epoch instead."""
    from tqdm import tqdm

    shown = enabled and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not shown, dynamic_ncols=True)


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, log=print) -> dict[str, Any]:
    """Train into `run_dir/train/`; returns the final epoch's metrics row (and the best accuracy)."""
    run_started = time.perf_counter()
    d = init_distributed(cfg.train.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tc = cfg.train
    splits = load_splits(cfg)
    model = build_model(cfg, splits.num_classes).to(d.device)
    amp = d.device.type == "cuda"
    sampler = GlobalBatchSampler(len(splits.train), tc.batch_size, cfg.seed, d)
    loader = DataLoader(splits.train, batch_sampler=sampler, num_workers=tc.num_workers, pin_memory=amp)
    eval_loader = DataLoader(splits.eval, batch_size=max(1, tc.batch_size // d.world), num_workers=tc.num_workers)
    net = nn.parallel.DistributedDataParallel(model) if d.world > 1 else model
    if tc.compile:  # the weights, adapter state and checkpoints stay those of `model`
        net = torch.compile(net)
    optimizer = make_optimizer(model, tc.weight_decay)
    train_dir = run_dir / "train"
    ckpt_path = train_dir / "last.ckpt"
    history: list[dict[str, Any]] = []
    start_epoch, step, best_acc = 0, 0, -1.0
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True) if resume and ckpt_path.is_file() else None
    if state is not None and state.get("config") != training_params(cfg):
        log(f"{ckpt_path} was written for other training settings: starting from epoch 1")
        state = None
    if state is not None:
        load_adapter(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start_epoch, step, best_acc, history = state["epoch"], state["step"], state["best_acc"], state["history"]
        log(f"resuming after epoch {start_epoch} of {tc.epochs} from {ckpt_path}")
        if d.main:
            write_metrics(train_dir / "metrics.csv", history)  # drop any row written after that checkpoint
    elif resume and not ckpt_path.is_file():
        log(f"no {ckpt_path} yet: starting from epoch 1")
    total_steps = tc.epochs * len(sampler)
    board = _tensorboard(train_dir / "tensorboard") if d.main else None
    for epoch in range(start_epoch, tc.epochs):
        sampler.set_epoch(epoch)
        net.train()
        loss_sum, correct, seen, started = 0.0, 0, 0, time.perf_counter()
        bar = _progress(loader, len(sampler), f"epoch {epoch + 1}/{tc.epochs}", d.main)
        for x, y in bar:
            lr = lr_at(step, total_steps, len(sampler), tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=tc.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
            rate = seen * d.world / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}")
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / seen, 6),
            "train_acc": round(correct / seen, 6),
            "eval_loss": "",
            "eval_acc": "",
            "lr": lr,
            "img_per_s": round(seen * d.world / seconds, 2),
            "seconds": round(seconds, 3),
        }
        if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
            eval_loss, eval_acc = evaluate(model, eval_loader, d, amp)
            row.update(eval_loss=round(eval_loss, 6), eval_acc=round(eval_acc, 6))
        history.append(row)
        if d.main:
            meta = adapter_metadata(cfg, model, {"epoch": epoch + 1, "eval_acc": row["eval_acc"]})
            save_adapter(train_dir / "adapter_last.safetensors", model, meta)
            if row["eval_acc"] != "" and row["eval_acc"] > best_acc:
                best_acc = row["eval_acc"]
                save_adapter(train_dir / "adapter.safetensors", model, meta)
            state = {
                "epoch": epoch + 1,
                "step": step,
                "best_acc": best_acc,
                "history": history,
                "adapter": adapter_state_dict(model),
                "optimizer": optimizer.state_dict(),
                "rng": _rng_state(),
                "config": training_params(cfg),
            }
            buffer = io.BytesIO()
            torch.save(state, buffer)
            atomic_replace(ckpt_path, buffer.getvalue())
            write_metrics(train_dir / "metrics.csv", history)
            if board is not None:
                for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "img_per_s"):
                    if row[key] != "":
                        board.add_scalar(key, row[key], epoch + 1)
                board.flush()
            log(
                f"epoch {epoch + 1}/{tc.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}"
                + (f", {splits.eval_split} acc {row['eval_acc']:.3f}" if row["eval_acc"] != "" else "")
                + f", {row['img_per_s']:.0f} img/s"
            )
    if start_epoch >= tc.epochs:
        log(f"{ckpt_path}: all {tc.epochs} epochs already completed")
    if d.main:
        inputs = [run_dir / "config.yaml"] + ([Path(cfg.checkpoint)] if cfg.checkpoint else [])
        outputs = [train_dir / n for n in ("adapter.safetensors", "adapter_last.safetensors", "metrics.csv")]
        record_stage(run_dir, "train", [p for p in inputs if p.is_file()], outputs, time.perf_counter() - run_started)
    if d.world > 1:
        dist.barrier()
    return {**history[-1], "best_acc": best_acc}
