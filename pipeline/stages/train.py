"""The train stage: fine-tune the run's backbone with its adapter on its dataset, into RUN/train/.

Writes (rank 0 only, every file atomically):
    train/adapter.safetensors       adapter + head tensors of the epoch to fold, metadata inside: the last
                                    one, or (`train.select: best-val`) the best on the validation split
    train/adapter_last.safetensors  the same for the last epoch
    train/metrics.csv               one row per completed epoch
    train/last.ckpt                 what a resume needs (`Trainer.state_dict()` and the training settings)
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vitfold.errors import VitfoldError, first_line
from vitfold.pipeline.adapting import save_adapter
from vitfold.pipeline.atomic import atomic_replace, atomic_write_text
from vitfold.pipeline.config import RunConfig, training_params
from vitfold.pipeline.data import build_splits, parse_data_spec
from vitfold.pipeline.models import build_backbone, build_model, data_transform
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Context, Stage, StageResult
from vitfold.pipeline.training import METRIC_FIELDS, Trainer, init_distributed


def base_identity(rd: RunDir, cfg: RunConfig) -> str:
    """What the backbone's weights are: the sha256 of the checkpoint file, else how they were made."""
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        return rd.sha256(path) if path.is_file() else f"missing file {path}"
    return "hub" if cfg.pretrained else f"random (seed {cfg.seed})"


def run_adapter_metadata(cfg: RunConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """What a run adds to an adapter file's metadata (`pipeline.save_adapter` writes the method, options,
    backbone, head size and version): the backbone's options and local weights, and `extra`."""
    return {"backbone_kwargs": cfg.backbone_kwargs, "checkpoint": cfg.checkpoint or "", **extra}


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, out.getvalue())


def _tensorboard(log_dir: Path):
    """A SummaryWriter when TensorBoard is installed, else None (metrics.csv is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _resume(rd: RunDir, cfg: RunConfig, trainer: Trainer, log) -> None:
    """Continue from train/last.ckpt when it was written for these training settings."""
    if not rd.last_ckpt.is_file():
        log(f"no {rd.last_ckpt} yet: starting from epoch 1")
        return
    try:
        state = torch.load(rd.last_ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, or holding objects weights_only refuses
        raise VitfoldError(f"cannot resume from {rd.last_ckpt}: {first_line(e)} (delete it to start over)") from None
    if state.get("config") != training_params(cfg):
        log(f"{rd.last_ckpt} was written for other training settings: starting from epoch 1")
        return
    trainer.load_state_dict(state)
    log(f"resuming after epoch {trainer.epoch} of {cfg.train.total_epochs} from {rd.last_ckpt}")
    if trainer.d.main:
        write_metrics(rd.metrics, trainer.history)  # drop any row written after that checkpoint


def _run(rd: RunDir, cfg: RunConfig, ctx: Context) -> StageResult:
    d = init_distributed(cfg.train.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)  # timm's Mixup draws its λ from numpy
    backbone = build_backbone(cfg)
    validation = cfg.train.select == "best-val"
    splits = build_splits(parse_data_spec(cfg.data), data_transform(cfg, backbone), validation)  # no random draw
    splits.check_eval()  # a bad evaluation image fails before the first epoch, not after it
    if cfg.num_classes is not None and cfg.num_classes < splits.num_classes:
        raise VitfoldError(
            f"num_classes {cfg.num_classes} is smaller than the {splits.num_classes} classes of {cfg.data}"
        )
    model = build_model(cfg, splits.num_classes, backbone).to(d.device)
    if d.main:
        ctx.settled()  # backbone, data and options resolved: the run's config.yaml may now say so
    trainer = Trainer(model, cfg.train, d, splits.train, splits.eval, cfg.seed, splits.select)
    if ctx.resume:
        _resume(rd, cfg, trainer, ctx.log)
    board = _tensorboard(rd.tensorboard) if d.main else None
    base = base_identity(rd, cfg)  # the adapter is tied to these base weights (the fold checks it)

    described = splits.describe()

    def save(row: dict[str, Any], chosen: bool) -> None:
        if not d.main:
            return
        extra = {"epoch": row["epoch"], "eval_acc": row["eval_acc"], "select_acc": row["select_acc"], "base": base}
        meta = run_adapter_metadata(cfg, {**extra, "select": cfg.train.select, "splits": json.dumps(described)})
        trained = trainer.folded_model  # the EMA of the weights when train.ema_decay is set
        save_adapter(trained, rd.adapter_last, backbone=cfg.backbone, **meta)
        if chosen:
            save_adapter(trained, rd.adapter, backbone=cfg.backbone, **meta)
        buffer = io.BytesIO()
        torch.save({**trainer.state_dict(), "config": training_params(cfg)}, buffer)
        atomic_replace(rd.last_ckpt, buffer.getvalue())
        write_metrics(rd.metrics, trainer.history)
        if board is not None:
            for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "select_acc", "lr", "img_per_s"):
                if row[key] != "":
                    board.add_scalar(key, row[key], row["epoch"])
            board.flush()

    if trainer.epoch >= cfg.train.total_epochs:
        ctx.log(f"{rd.last_ckpt}: all {cfg.train.total_epochs} epochs already completed")
        result = trainer.result()
    else:
        result = trainer.fit(save, eval_name=splits.eval_split, log=ctx.log)
    if d.world > 1:
        dist.barrier()
    return StageResult([rd.adapter, rd.adapter_last, rd.metrics], value=result)


def _inputs(rd: RunDir, cfg: RunConfig) -> list[Path]:
    return [Path(cfg.checkpoint)] if cfg.checkpoint else []


TRAIN = Stage("train", section=None, inputs=_inputs, run=_run, params=training_params)
