"""`vitfold` command line: a click group of thin commands. Heavy imports happen inside commands."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

from export import DEFAULT_FORMATS
from pipeline.errors import VitfoldError


class _UserError(click.ClickException):
    """A `VitfoldError` shown as one line, exiting with its code (2: input error)."""

    def __init__(self, error: VitfoldError) -> None:
        # an error re-raised from a DataLoader worker carries the worker's traceback: keep its last line
        last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        super().__init__(last.removeprefix(f"{type(error).__module__}.{type(error).__name__}: "))
        self.exit_code = error.exit_code


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VitfoldError as e:
            raise _UserError(e) from None


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got '{pair}'", param_hint="--option")
        options[key.replace("-", "_")] = yaml.safe_load(value)
    return options


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vitfold")
def main() -> None:
    """Fine-tune timm ViTs with foldable adapters, fold them away, export and verify the result."""


@main.command()
@click.option("--backbone", required=True, help="timm model name, e.g. vit_base_patch16_224.")
@click.option("--method", default="rlrr", show_default=True, help="Adapter method.")
@click.option("--num-classes", type=click.IntRange(min=1), help="Replace the head with a new one of N classes.")
@click.option("--rank", type=click.IntRange(min=1), help="Rank of the EFFT factors (efft1, efft2).")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE", help="Adapter option (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(
    backbone: str, method: str, num_classes: int | None, rank: int | None, options: tuple[str, ...], as_json: bool
) -> None:
    """Parameter counts of BACKBONE with an adapter attached (random weights, no download)."""
    from pipeline.adapting import adapt, parameter_counts
    from pipeline.backbones import create_backbone

    method_options = _parse_options(options) | ({"rank": rank} if rank is not None else {})
    model = adapt(create_backbone(backbone), method, num_classes=num_classes, **method_options)
    counts = {"backbone": backbone, "method": method, **parameter_counts(model)}
    if as_json:
        click.echo(json.dumps(counts, indent=2))
        return
    for key, value in counts.items():
        click.echo(f"{key:16s} {value:,}" if isinstance(value, int) else f"{key:16s} {value}")
    share = counts["adapter_params"] / counts["backbone_params"]
    click.echo(f"{'adapter/backbone':16s} {share:.3%}")


def _echo(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(message, err=True)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Run config (YAML); flags override it.")
@click.option("--backbone", help="timm ViT name, e.g. vit_base_patch16_224.orig_in21k.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local backbone weights (.safetensors/.pth/.npz).")
@click.option("--pretrained", is_flag=True, default=None, help="Download the backbone's weights from the hub.")
@click.option("--data", help="digits[:5-9] | folder:PATH | vtab:PATH")
@click.option("--method", help="rlrr | efft1 | efft2 | lora | linear | full")
@click.option("--recipe", help="rlrr-vtab:<task> | efft1-vtab:<task> | efft2-vtab:<task>")
@click.option("--rank", type=click.IntRange(min=1), help="Rank (efft1, efft2, lora).")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE", help="Adapter option (repeatable).")
@click.option("--num-classes", type=click.IntRange(min=1), help="Head size (default: the dataset's classes).")
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--batch-size", type=click.IntRange(min=1), help="Global batch size.")
@click.option("--lr", type=float)
@click.option("--weight-decay", type=float)
@click.option("--drop-path", type=float)
@click.option("--eval-every", type=click.IntRange(min=1))
@click.option("--num-workers", type=click.IntRange(min=0))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--compile", "compile_model", is_flag=True, default=None, help="torch.compile the training step.")
@click.option("--seed", type=int)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue from OUT/train/last.ckpt with OUT/config.yaml.")
def train(  # one parameter per option, as click passes them
    config_path, backbone, checkpoint, pretrained, data, method, recipe, rank, options, num_classes, epochs,
    batch_size, lr, weight_decay, drop_path, eval_every, num_workers, device, compile_model, seed, out, resume,
) -> None:  # fmt: skip
    """Fine-tune a timm ViT with an adapter; writes OUT/config.yaml and OUT/train/."""
    from pipeline.config import load_config
    from pipeline.run import atomic_write_text
    from pipeline.train import train as train_stage

    run_dir = Path(out)
    if resume and config_path is None and (run_dir / "config.yaml").is_file():
        config_path = str(run_dir / "config.yaml")
    if config_path is not None and not Path(config_path).is_file():
        raise VitfoldError(f"config file not found: {config_path}")
    method_options = _parse_options(options) | ({"rank": rank} if rank is not None else {})
    cfg = load_config(
        config_path,
        backbone=backbone, checkpoint=checkpoint, pretrained=pretrained, data=data, method=method, recipe=recipe,
        num_classes=num_classes, seed=seed, method_options=method_options or None,
        train={"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
               "drop_path": drop_path, "eval_every": eval_every, "num_workers": num_workers, "device": device,
               "compile": compile_model},
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    result = train_stage(cfg, run_dir, resume=resume, log=_echo)
    _echo(f"best eval accuracy {result['best_acc']:.4f}; adapter: {run_dir / 'train' / 'adapter.safetensors'}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def fold(run_dir: str) -> None:
    """Fold RUN_DIR's trained adapter into the backbone: RUN_DIR/fold/model.safetensors."""
    from pipeline.fold_stage import fold_stage

    fold_stage(Path(run_dir), log=_echo)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--format", "formats", default=",".join(DEFAULT_FORMATS), show_default=True,
              help="Comma-separated: onnx, torchscript, aoti, tensorrt.")  # fmt: skip
@click.option("--precision", default="fp32", show_default=True, help="fp32 | fp16 (onnx, tensorrt).")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset (>= 17).")
@click.option("--triton", "triton_dir", type=click.Path(file_okay=False), help="Also write a Triton model repository.")
@click.option("--device", default="cpu", show_default=True, help="Device for the AOTInductor package: cpu | cuda.")
def export(run_dir: str, formats: str, precision: str, opset: int, triton_dir: str | None, device: str) -> None:
    """Export RUN_DIR's folded model: RUN_DIR/export/ (model.onnx, model.pt, model.pt2, model.plan)."""
    from export.stage import export_stage, parse_formats

    export_stage(Path(run_dir), parse_formats(formats), precision, opset,
                 Path(triton_dir) if triton_dir else None, device, log=_echo)  # fmt: skip


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--backends", help="Comma-separated (default: every available one): torchscript, onnxruntime, aoti, "
              "tensorrt. torch-folded (the fold) is always checked.")  # fmt: skip
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--samples", default=16, show_default=True, type=click.IntRange(min=1),
              help="Evaluation images, and as many random images.")  # fmt: skip
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda")
@click.option("--max-rel", type=float, help="Tolerance: max |Δ| / max |logit| (default fp32 1e-4, fp16 2e-2).")
@click.option("--cosine-min", type=float, help="Tolerance: least cosine similarity of a logit vector.")
@click.option("--top1-min", type=float, help="Tolerance: least top-1 agreement.")
def verify(run_dir: str, backends: str | None, batch_sizes: str, samples: int, device: str,
           max_rel: float | None, cosine_min: float | None, top1_min: float | None) -> None:  # fmt: skip
    """Check that every artifact computes what the unmerged adapted model computes (exit 0 pass, 1 mismatch)."""
    from export.bench import parse_batch_sizes
    from export.verify import verify_stage

    limits = {"max_rel": max_rel, "cosine_min": cosine_min, "top1_min": top1_min}
    result = verify_stage(Path(run_dir), _names(backends), parse_batch_sizes(batch_sizes), samples, device,
                          {k: v for k, v in limits.items() if v is not None}, log=_echo)  # fmt: skip
    _echo(f"wrote {Path(run_dir) / 'verify' / 'verify.json'}, verify.md, junit.xml")
    if not result["passed"]:
        sys.exit(1)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--backends", help="Comma-separated (default: every available one): torch-unmerged, torch-folded, "
              "torch-base, torchscript, onnxruntime, aoti, tensorrt.")  # fmt: skip
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: torch's current count).")
@click.option("--min-iters", default=50, show_default=True, type=click.IntRange(min=1),
              help="Timed calls (or --min-seconds).")  # fmt: skip
@click.option("--min-seconds", default=3.0, show_default=True, type=float, help="Timed seconds (or --min-iters).")
def bench(run_dir: str, backends: str | None, batch_sizes: str, device: str, threads: int | None, min_iters: int,
          min_seconds: float) -> None:  # fmt: skip
    """Latency of every backend per batch size: RUN_DIR/bench/bench.json, bench.csv, latency.png."""
    from export.bench import bench_stage, parse_batch_sizes

    bench_stage(Path(run_dir), _names(backends), parse_batch_sizes(batch_sizes), device, threads, min_iters,
                min_seconds, log=_echo)  # fmt: skip


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir: str) -> None:
    """Write RUN_DIR/REPORT.md from the stages' outputs."""
    from pipeline.report import report_stage

    report_stage(Path(run_dir), log=_echo)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Run config (YAML).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--force", "force", help="Rerun from this stage on (pretrain, train, compare, fold, export, verify, "
              "bench, report).")  # fmt: skip
def run(config_path: str | None, out: str, force: str | None) -> None:
    """Run every stage that is out of date into the run directory OUT (exit 1 if verify fails)."""
    from pipeline.config import load_config
    from pipeline.manifest import read_manifest
    from pipeline.pretrain import pretrained_path
    from pipeline.run import atomic_write_text
    from pipeline.stages import run_pipeline

    if config_path is not None and not Path(config_path).is_file():
        raise VitfoldError(f"config file not found: {config_path}")
    cfg = load_config(config_path)
    if cfg.pretrain:
        if cfg.checkpoint or cfg.pretrained:
            raise VitfoldError("config: 'pretrain' makes the backbone weights; drop 'checkpoint'/'pretrained'")
        cfg.checkpoint = str(pretrained_path(cfg))
    run_dir = Path(out)
    saved = run_dir / "config.yaml"
    if not saved.is_file() or saved.read_text() != cfg.to_yaml():  # rewritten only when it changes
        atomic_write_text(saved, cfg.to_yaml())
    _echo(f"run directory: {run_dir}  (backbone {cfg.backbone}, method {cfg.method}, data {cfg.data})")
    started = time.perf_counter()
    outcome = run_pipeline(cfg, run_dir, force, log=_echo)
    ran = [name for name, what in outcome.items() if what != "up to date"]
    _echo(f"done in {time.perf_counter() - started:.1f} s; ran: {', '.join(ran) or 'nothing (all up to date)'}; "
          f"report: {run_dir / 'REPORT.md'}")  # fmt: skip
    if not read_manifest(run_dir)["stages"].get("verify", {}).get("passed", True):
        _echo(f"verify FAILED: see {run_dir / 'verify' / 'verify.md'}")
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
