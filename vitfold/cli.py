"""`vitfold` command line: parsing and printing only; the work is the stage layer's. Heavy imports happen
inside commands, so `vitfold --help` is instant."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vitfold.errors import VitfoldError
from vitfold.export import DEFAULT_FORMATS, FORMATS, PRECISIONS, format_names
from vitfold.names import ARTIFACT_BACKENDS, BACKENDS, DROP_PATH_MODES, FOLDED
from vitfold.names import METHODS as METHOD_NAMES
from vitfold.names import OFFICIAL_METHODS as OFFICIAL_NAMES
from vitfold.names import STAGES as STAGE_NAMES

# `vitfold --help` lists the stage commands in pipeline order, then the whole pipeline and the utilities
COMMAND_ORDER = (
    "train",
    "import-official",
    "import-peft",
    "fold",
    "export",
    "triton",
    "verify",
    "bench",
    "report",
    "run",
    "info",
    "configs",
)


# library argument -> the flag that sets it, where the names differ (others: --argument-with-dashes)
ARGUMENT_FLAGS = {"formats": "--format", "model_name": "--triton-name"}


class _UserError(click.ClickException):
    """A `VitfoldError` shown as one line, exiting with its code (2: input error); an error about a library
    argument names the flag that set it."""

    def __init__(self, error: VitfoldError) -> None:
        text = error.as_flag(ARGUMENT_FLAGS).strip()
        # an error re-raised from a DataLoader worker carries the worker's traceback: keep its last line
        last = text.splitlines()[-1] if text else type(error).__name__
        super().__init__(last.removeprefix(f"{type(error).__module__}.{type(error).__name__}: "))
        self.exit_code = error.exit_code


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        """`COMMAND_ORDER`, then any other command in the order it was defined."""
        return sorted(self.commands, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VitfoldError as e:
            raise _UserError(e) from None
        except click.UsageError as e:  # a bad flag value: the same one line, without the usage block
            raise _UserError(VitfoldError(e.format_message())) from None


def parse_batch_sizes(text: str | None) -> list[int] | None:
    """'1,8,32' -> [1, 8, 32] (None stays None); a VitfoldError naming --batch-sizes otherwise."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise VitfoldError(f"--batch-sizes: no batch size in '{text}' (e.g. 1,8,32)")
    for part in parts:
        if not (part.isascii() and part.isdigit()) or int(part) == 0:
            raise VitfoldError(f"--batch-sizes: '{part}' is not a positive integer (e.g. 1,8,32)")
    return [int(p) for p in parts]


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got '{pair}'", param_hint="--option")
        options[key.replace("-", "_")] = yaml.safe_load(value)
    return options


def _echo(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(message, err=True)


# -- options shared by several commands, defined once ------------------------------------------------

Decorator = Callable[[Callable], Callable]
run_dir_argument: Decorator = click.argument("run_dir", type=click.Path(file_okay=False))
method_options: Decorator = click.option(
    "-o", "--option", "options", multiple=True, metavar="KEY=VALUE", help="Adapter option (repeatable)."
)


def device_option(help: str = "cpu | cuda") -> Decorator:
    return click.option("--device", help=f"{help} (default: the run config's, cpu).")


def batch_sizes_option(default: str) -> Decorator:
    return click.option("--batch-sizes", help=f"Comma-separated batch sizes (default: the run config's, {default}).")


config_option: Decorator = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Run config (a YAML file or a shipped config's name); flags override it.",
)


def base_options(command: Callable) -> Callable:
    """--backbone, --checkpoint, --pretrained: the backbone and where its weights come from."""
    for option in reversed(
        (
            click.option("--backbone", help="timm ViT name, e.g. vit_base_patch16_224.orig_in21k."),
            click.option(
                "--checkpoint", type=click.Path(dir_okay=False), help="Local backbone weights (.safetensors/.pth/.npz)."
            ),
            click.option(
                "--pretrained",
                is_flag=True,
                default=None,
                help="The backbone's weights from the hub (or a warm Hugging Face cache; HF_HUB_OFFLINE=1 honoured).",
            ),
        )
    ):
        command = option(command)
    return command


def _read_config(config_path: str | None, check: bool = True, **overrides: Any) -> Any:
    """The run config: `config_path` (a file, or a shipped config's name) with the non-None `overrides`
    (`check=False`: see `load_config`)."""
    from vitfold.pipeline.config import config_file, load_config

    return load_config(None if config_path is None else config_file(config_path), check=check, **overrides)


def _check_config(cfg: Any, config_path: str) -> None:
    """`check_config` on a config read with `check=False`, naming its file as `load_config` would."""
    from vitfold.pipeline.config import check_config, config_file

    check_config(cfg, f"config {config_file(config_path)}")


trust_option: Decorator = click.option(
    "--trust", is_flag=True, help="Load .pt2/.plan/.pt artifacts that this machine's vitfold did not export."
)


def backends_option(names: str) -> Decorator:
    return click.option("--backends", help=f"Comma-separated (default: every available one): {names}.")


def _stage(name: str, run_dir: str, out_dir: str | None = None, trust: bool = False, **overrides: Any) -> Any:
    from vitfold.pipeline.stages import run_stage

    settings = {k: v for k, v in overrides.items() if v is not None}
    return run_stage(name, run_dir, log=_echo, out_dir=out_dir, trust=trust, **settings)


# -- commands -----------------------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vitfold")
def main() -> None:
    """Fine-tune timm ViTs with foldable adapters, fold them away, export and verify the result.

    The stage commands below come in pipeline order (train, fold, export, verify, bench, report); `run`
    runs every out-of-date stage of a config. Start with: vitfold run --config demo --out runs/demo (the offline demo
    config that ships with vitfold)
    """


@main.command()
@click.option("--backbone", help="timm model name, e.g. vit_base_patch16_224.")
@click.option("--method", type=click.Choice(METHOD_NAMES), default="rlrr", show_default=True, help="Adapter method.")
@click.option("--num-classes", type=click.IntRange(min=1), help="Replace the head with a new one of N classes.")
@click.option("--rank", type=click.IntRange(min=1), help="Rank of the EFFT factors (efft1, efft2).")
@method_options
@click.option(
    "--run", "run_dir", type=click.Path(file_okay=False), help="The backbone, method and options of a run instead."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(
    backbone: str | None,
    method: str,
    num_classes: int | None,
    rank: int | None,
    options: tuple[str, ...],
    run_dir: str | None,
    as_json: bool,
) -> None:
    """Parameter counts of BACKBONE with an adapter attached, or of a run's model (--run: a trained or
    imported run); no weights are made or downloaded."""
    import torch

    from vitfold.pipeline.adapting import adapt, parameter_counts
    from vitfold.pipeline.backbones import create_backbone

    kwargs: dict[str, Any] = {}
    method_opts = _parse_options(options) | ({"rank": rank} if rank is not None else {})
    if run_dir is not None:
        from vitfold.pipeline.stages import RunDir

        cfg = RunDir(run_dir).config
        backbone, method, num_classes = cfg.backbone, cfg.method, cfg.num_classes
        kwargs, method_opts = cfg.backbone_kwargs, {**cfg.method_options, **method_opts}
    elif backbone is None:
        raise VitfoldError("vitfold info needs --backbone NAME (or --run RUN_DIR)")
    with torch.device("meta"):  # shapes only: instant, even for ViT-H
        model = adapt(create_backbone(backbone, **kwargs), method, num_classes=num_classes, **method_opts)
    counts = {"backbone": backbone, "method": method, **parameter_counts(model)}
    if as_json:
        click.echo(json.dumps(counts, indent=2))
        return
    for key, value in counts.items():
        click.echo(f"{key:16s} {value:,}" if isinstance(value, int) else f"{key:16s} {value}")
    share = counts["adapter_params"] / counts["backbone_params"]
    click.echo(f"{'adapter/backbone':16s} {share:.3%}")


@main.command()
@config_option
@base_options
@click.option("--data", help="digits[:5-9] | folder:PATH | vtab:PATH | fgvc:PATH")
@click.option("--method", type=click.Choice(METHOD_NAMES), help="Adapter method (default: the config's, rlrr).")
@click.option(
    "--recipe",
    help="rlrr-vtab:<task> | efft1-vtab:<task> | efft2-vtab[-released|-vit-l|-vit-h|-swin-s|-swin-b|-swin-l]:<task> | "
    "rlrr-fgvc[-aug]:<dataset>",
)
@click.option("--rank", type=click.IntRange(min=1), help="Rank (efft1, efft2, lora).")
@method_options
@click.option("--num-classes", type=click.IntRange(min=1), help="Head size (default: the dataset's classes).")
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--batch-size", type=click.IntRange(min=1), help="Global batch size.")
@click.option("--lr", type=float)
@click.option("--weight-decay", type=float)
@click.option("--drop-path", type=float)
@click.option(
    "--drop-path-mode",
    type=click.Choice(DROP_PATH_MODES),
    help="Drop path operator (official: the official RLRR model's for the family).",
)
@click.option("--select", type=click.Choice(["last", "best-val"]), help="The epoch to fold (default: last).")
@click.option("--eval-every", type=click.IntRange(min=1))
@click.option("--num-workers", type=click.IntRange(min=0))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--compile", "compile_model", is_flag=True, default=None, help="torch.compile the training step.")
@click.option("--seed", type=int)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option(
    "--resume", is_flag=True, help="Continue the run in OUT from its last epoch checkpoint, with its saved config."
)
@click.option("--print-plan", is_flag=True, help="Print the resolved training plan as JSON; train nothing.")
def train(  # one parameter per option, as click passes them
    config_path,
    backbone,
    checkpoint,
    pretrained,
    data,
    method,
    recipe,
    rank,
    options,
    num_classes,
    epochs,
    batch_size,
    lr,
    weight_decay,
    drop_path,
    drop_path_mode,
    select,
    eval_every,
    num_workers,
    device,
    compile_model,
    seed,
    out,
    resume,
    print_plan,
) -> None:
    """Fine-tune a timm ViT with an adapter into the run directory OUT (its config and train/)."""
    from vitfold.pipeline.stages import RunDir, run_stage

    rd = RunDir(out)
    if resume and config_path is None:
        if not rd.config_file.is_file():
            raise VitfoldError(f"--resume: {rd.path} holds no run to resume ({rd.config_file.name} not found)")
        config_path = str(rd.config_file)
    method_opts = _parse_options(options) | ({"rank": rank} if rank is not None else {})
    cfg = _read_config(
        config_path,
        backbone=backbone,
        checkpoint=checkpoint,
        pretrained=pretrained,
        data=data,
        method=method,
        recipe=recipe,
        num_classes=num_classes,
        seed=seed,
        method_options=method_opts or None,
        train={
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "drop_path": drop_path,
            "drop_path_mode": drop_path_mode,
            "select": select,
            "eval_every": eval_every,
            "num_workers": num_workers,
            "device": device,
            "compile": compile_model,
        },
    )
    if cfg.pretrain and not resume:
        _echo(
            f"WARNING: {config_path}: train alone ignores the 'pretrain:' section (vitfold run pre-trains the "
            f"backbone first); training on {cfg.checkpoint or ('hub weights' if cfg.pretrained else 'a random init')}"
        )
    if print_plan:
        from vitfold.pipeline.plan import training_plan

        click.echo(json.dumps(training_plan(cfg), indent=1))
        return
    result = run_stage("train", rd, settings=cfg, config=cfg, resume=resume, log=_echo)
    chosen = result["selected"]  # best-val: the best epoch on the validation split, not on the evaluation one
    why = f"best-val: val accuracy {chosen['select_acc']:.4f}" if cfg.train.select == "best-val" else "last"
    _echo(f"epoch {chosen['epoch']} to fold ({why}): eval accuracy {chosen['eval_acc']:.4f}; adapter: {rd.adapter}")


@main.command("import-official")
@click.argument("official", metavar="CHECKPOINT", type=click.Path(dir_okay=False))
@click.option("--method", required=True, type=click.Choice(OFFICIAL_NAMES), help="The official code that wrote it.")
@config_option
@base_options
@click.option("--data", help="Evaluation data for verify: digits[:5-9] | folder:PATH | vtab:PATH | fgvc:PATH")
@method_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New run directory.")
def import_official(
    official: str,
    method: str,
    config_path: str | None,
    backbone: str | None,
    checkpoint: str | None,
    pretrained: bool | None,
    data: str | None,
    options: tuple[str, ...],
    out: str,
) -> None:
    """Turn a CHECKPOINT of the official RLRR or EFFT code into the run directory OUT (then fold, export,
    verify). EFFT2 needs -o scale=S; an RLRR checkpoint holds no backbone: --pretrained or --checkpoint."""
    from vitfold.pipeline.stages.import_official import import_official as run_import

    method_opts = _parse_options(options)
    cfg = _read_config(
        config_path,
        backbone=backbone,
        checkpoint=checkpoint,
        pretrained=pretrained,
        data=data,
        method=method,
        method_options=method_opts or None,
    )
    run_import(method, official, out, cfg, log=_echo)


@main.command("import-peft")
@click.argument("adapter_dir", metavar="DIR", type=click.Path(file_okay=False))
@config_option
@base_options
@click.option("--data", help="Evaluation data for verify: digits[:5-9] | folder:PATH | vtab:PATH | fgvc:PATH")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New run directory.")
def import_peft(
    adapter_dir: str,
    config_path: str | None,
    backbone: str | None,
    checkpoint: str | None,
    pretrained: bool | None,
    data: str | None,
    out: str,
) -> None:
    """Turn a Hugging Face PEFT LoRA adapter folder DIR (adapter_config.json + adapter_model.safetensors, trained
    on a timm ViT) into the run directory OUT (then fold, export, verify). The base weights: --pretrained or
    --checkpoint; --backbone defaults to the adapter's base_model_name_or_path when it is timm/NAME."""
    from vitfold.pipeline.stages.import_peft import import_peft as run_import
    from vitfold.pipeline.stages.import_peft import peft_backbone

    if backbone is None and config_path is None:
        backbone = peft_backbone(adapter_dir)
    cfg = _read_config(config_path, backbone=backbone, checkpoint=checkpoint, pretrained=pretrained, data=data)
    run_import(adapter_dir, out, cfg, log=_echo)


@main.command()
@run_dir_argument
@click.option(
    "--base-mismatch-ok", is_flag=True, default=None, help="Fold onto base weights other than the trained-on ones."
)
def fold(run_dir: str, base_mismatch_ok: bool | None) -> None:
    """Fold RUN_DIR's trained adapter into the backbone: RUN_DIR/fold/model.safetensors."""
    _stage("fold", run_dir, base_mismatch_ok=base_mismatch_ok)


@main.command()
@run_dir_argument
@click.option(
    "--format",
    "formats",
    help=f"Comma-separated: {', '.join(FORMATS)} (default: the run config's, {','.join(DEFAULT_FORMATS)}).",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    help="Add artifacts at this precision beside the fp32 ones: fp16 (onnx; aoti and tensorrt on cuda), "
    "bf16 (aoti, openvino), int8 (onnx, tensorrt, openvino: the fastest CPU INT8). Default: the run config's, fp32.",
)
@click.option("--opset", type=click.IntRange(min=17), help="ONNX opset (default: the run config's, 18).")
@click.option("--calibration-samples", type=click.IntRange(min=1), help="int8: training images to calibrate on (256).")
@click.option(
    "--int8-mode", type=click.Choice(["static", "dynamic"]), help="int8: static QDQ (calibrated; default) or dynamic."
)
@click.option(
    "--triton",
    type=click.Path(file_okay=False),
    help="Also write a Triton model repository (exports again; from the recorded artifacts: vitfold triton RUN DIR).",
)
@click.option("--triton-name", help="Triton: the models' name prefix (default: the backbone's architecture).")
@click.option(
    "--max-batch", type=click.IntRange(min=1), help="Triton: max_batch_size (default: the largest verify batch size)."
)
@click.option(
    "--replace-triton", is_flag=True, default=None, help="Triton: replace model folders this run did not write."
)
@device_option("Device for the AOTInductor package: cpu | cuda")
def export(
    run_dir: str,
    formats: str | None,
    precision: str | None,
    opset: int | None,
    calibration_samples: int | None,
    int8_mode: str | None,
    triton: str | None,
    triton_name: str | None,
    max_batch: int | None,
    replace_triton: bool | None,
    device: str | None,
) -> None:
    """Export RUN_DIR's folded model: RUN_DIR/export/ (model.onnx, model.pt, model.pt2, model.plan)."""
    names = None if formats is None else format_names(_names(formats) or [])
    _stage(
        "export",
        run_dir,
        formats=names,
        precision=precision,
        opset=opset,
        calibration_samples=calibration_samples,
        int8_mode=int8_mode,
        triton=triton,
        triton_name=triton_name,
        triton_max_batch=max_batch,
        triton_force=replace_triton,
        device=device,
    )


@main.command()
@run_dir_argument
@click.argument("repository", type=click.Path(file_okay=False))
@click.option("--triton-name", help="The models' name prefix (default: the backbone's architecture).")
@click.option(
    "--max-batch", type=click.IntRange(min=1), help="max_batch_size (default: the largest verify batch size)."
)
@click.option("--replace-triton", is_flag=True, help="Replace model folders this run did not write.")
def triton(run_dir: str, repository: str, triton_name: str | None, max_batch: int | None, replace_triton: bool) -> None:
    """Write a Triton model repository from RUN_DIR's recorded artifacts, without exporting again (each is
    checked against the sha256 the export recorded; the run's verification stays as it is)."""
    from vitfold.pipeline.stages import RunDir
    from vitfold.pipeline.stages.export import triton_from_export

    configs = triton_from_export(RunDir(run_dir), repository, triton_name, max_batch, replace_triton)
    _echo(f"triton repository: {repository} ({', '.join(c.parent.name for c in configs)})")


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@backends_option(f"{', '.join(ARTIFACT_BACKENDS)}; {FOLDED} (the fold) is always checked")
@batch_sizes_option("1,8")
@click.option("--samples", type=click.IntRange(min=1), help="Evaluation images, and as many random images (16).")
@device_option()
@click.option(
    "--max-rel", type=float, help="Tolerance: max |Δ| / max |logit| (default fp32 1e-4, fp16 2e-2, bf16 8e-2)."
)
@click.option("--cosine-min", type=float, help="Tolerance: least cosine similarity of a logit vector.")
@click.option("--top1-min", type=float, help="Tolerance: least top-1 agreement on the sample.")
@click.option(
    "--split-top1-min", type=float, help="Tolerance: least top-1 agreement on the evaluation split (int8: 0.99)."
)
@click.option(
    "--accuracy-delta-min", type=float, help="Tolerance: least accuracy change on the split, points (int8: -0.5)."
)
@click.option(
    "--atol",
    type=float,
    help="Tolerance, elementwise: |a − b| ≤ atol + rtol·|b| for every logit, as torch.testing.assert_close and "
    "Polygraphy judge; replaces max_rel and cosine_min (top-1 and the split bars stay). Off by default.",
)
@click.option("--rtol", type=float, help="Tolerance, elementwise: the rtol of --atol's bar (0 when only --atol).")
@click.option("--eval-images", type=click.IntRange(min=1), help="Evaluation-split images for accuracy (default: all).")
@click.option("--allow-no-export", is_flag=True, default=None, help="Pass with only the fold checked (no artifact).")
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    help="Write the results here, not into RUN_DIR (read-only); with --artifact default ./verify-artifact.",
)
@click.option(
    "--artifact",
    type=click.Path(dir_okay=False),
    help="Check this file (.onnx, .pt, .pt2, .plan) instead of a run's own artifacts; needs --reference.",
)
@click.option(
    "--reference",
    help="With --artifact: a run directory, a folded .safetensors, local-dir:FOLDER, or a timm name (+ --checkpoint).",
)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="With a timm name as --reference: its weights.")
@click.option("--backbone", help="With a .safetensors --reference without vitfold metadata: its timm name.")
@click.option("--num-classes", type=click.IntRange(min=1), help="With --reference not a run: the head size.")
@click.option(
    "--backbone-option", "backbone_options", multiple=True, metavar="KEY=VALUE", help="timm create_model option."
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    help="With --artifact: its precision (default: read from the artifact: its graph, package or plan record).",
)
@click.option("--input-name", help="With an --artifact .onnx of several inputs: the one that takes the images.")
@click.option("--output-name", help="With an --artifact .onnx of several outputs: the one that holds the logits.")
@trust_option
def verify(
    run_dir: str | None,
    backends: str | None,
    batch_sizes: str | None,
    samples: int | None,
    device: str | None,
    max_rel: float | None,
    cosine_min: float | None,
    top1_min: float | None,
    split_top1_min: float | None,
    accuracy_delta_min: float | None,
    atol: float | None,
    rtol: float | None,
    eval_images: int | None,
    allow_no_export: bool | None,
    output: str | None,
    artifact: str | None,
    reference: str | None,
    checkpoint: str | None,
    backbone: str | None,
    num_classes: int | None,
    backbone_options: tuple[str, ...],
    precision: str | None,
    input_name: str | None,
    output_name: str | None,
    trust: bool,
) -> None:
    """Check that every artifact of RUN_DIR computes what the unmerged adapted model computes, or that one
    --artifact computes what its --reference computes (exit 0 pass, 1 mismatch)."""
    limits = {
        "max_rel": max_rel,
        "cosine_min": cosine_min,
        "top1_min": top1_min,
        "split_top1_min": split_top1_min,
        "accuracy_delta_min": accuracy_delta_min,
        "atol": atol,
        "rtol": rtol,
    }
    settings = {
        "batch_sizes": parse_batch_sizes(batch_sizes),
        "samples": samples,
        "device": device,
        "tolerances": {k: v for k, v in limits.items() if v is not None} or None,
        "eval_images": eval_images,
    }
    reference_options = {
        "--reference": reference,
        "--checkpoint": checkpoint,
        "--backbone": backbone,
        "--num-classes": num_classes,
        "--backbone-option": backbone_options or None,
        "--precision": precision,
        "--input-name": input_name,
        "--output-name": output_name,
    }
    if artifact is not None:
        from vitfold.pipeline.stages.verify_artifact import DEFAULT_OUTPUT, verify_artifact

        misplaced = {"RUN_DIR": run_dir, "--backends": backends, "--allow-no-export": allow_no_export}
        given = [name for name, value in misplaced.items() if value is not None]
        if given or reference is None:
            raise VitfoldError(
                f"--artifact: {given[0]} does not apply (give the run as --reference RUN_DIR)"
                if given
                else "--artifact needs --reference (a run directory, a folded .safetensors, local-dir:FOLDER or a "
                "timm name with --checkpoint)"
            )
        result = verify_artifact(
            artifact,
            reference,
            out_dir=output,
            checkpoint=checkpoint,
            backbone=backbone,
            num_classes=num_classes,
            backbone_kwargs=_parse_options(backbone_options),
            precision=precision,
            input_name=input_name,
            output_name=output_name,
            trust=trust,
            log=_echo,
            **settings,
        )
        folder = Path(output) if output else DEFAULT_OUTPUT
    else:
        given = [name for name, value in reference_options.items() if value is not None]
        if run_dir is None or given:
            raise VitfoldError(
                f"{given[0]} applies only with --artifact FILE"
                if given
                else "verify needs RUN_DIR, or --artifact FILE --reference REF (vitfold verify --help)"
            )
        result = _stage(
            "verify",
            run_dir,
            backends=_names(backends),
            allow_no_export=allow_no_export,
            out_dir=output,
            trust=trust,
            **settings,
        )
        folder = Path(output) if output else Path(run_dir) / "verify"
    _echo(f"wrote {folder}: verify.json, verify.md, junit.xml")
    if not result["passed"]:
        sys.exit(1)


@main.command()
@run_dir_argument
@backends_option(", ".join(BACKENDS))
@batch_sizes_option("1,8,32")
@device_option()
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: torch's current count).")
@click.option("--min-iters", type=click.IntRange(min=1), help="Timed calls per row, at least; default 50.")
@click.option("--min-seconds", type=float, help="Timed seconds per row, at least (as well); default 3.")
@click.option("--rounds", type=click.IntRange(min=1), help="Rounds that alternate the backends; default 10.")
@click.option("--unstable-above", type=float, help="Flag a row unstable above this rounds' IQR / median; default 0.1.")
@click.option(
    "--spin/--no-spin",
    default=None,
    help="ONNX Runtime's idle threads spin after each call (default: no, so they leave the cores to the next backend).",
)
@click.option(
    "--roofline/--no-roofline", default=None, help="CPU: each row's GFLOP/s and % of the matmul peak (default: yes)."
)
@trust_option
def bench(
    run_dir: str,
    backends: str | None,
    batch_sizes: str | None,
    device: str | None,
    threads: int | None,
    min_iters: int | None,
    min_seconds: float | None,
    rounds: int | None,
    unstable_above: float | None,
    spin: bool | None,
    roofline: bool | None,
    trust: bool,
) -> None:
    """Latency of every backend per batch size: RUN_DIR/bench/bench.json, bench.csv, latency.png."""
    _stage(
        "bench",
        run_dir,
        backends=_names(backends),
        batch_sizes=parse_batch_sizes(batch_sizes),
        device=device,
        threads=threads,
        min_iters=min_iters,
        min_seconds=min_seconds,
        rounds=rounds,
        unstable_above=unstable_above,
        spin=spin,
        roofline=roofline,
        trust=trust,
    )


@main.command()
@run_dir_argument
def report(run_dir: str) -> None:
    """Write RUN_DIR/REPORT.md from the stages' outputs."""
    _stage("report", run_dir)


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Run config: a YAML file, or a shipped config's name (vitfold configs lists them).",
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--force", "force", type=click.Choice(STAGE_NAMES), help="Rerun from this stage on.")
@trust_option
def run(config_path: str | None, out: str, force: str | None, trust: bool) -> None:
    """Run every stage of --config that is out of date into the run directory OUT (exit 1 if verify fails)."""
    from vitfold.pipeline.stages import RunDir
    from vitfold.pipeline.stages.manifest import pipeline_unchanged, read_manifest
    from vitfold.pipeline.stages.pretrain import pretrained_path

    rd = RunDir(out)
    if config_path is None:
        raise VitfoldError(
            "vitfold run needs --config FILE: start with vitfold run --config demo --out runs/demo "
            "(the offline demo), or copy and edit a shipped config (vitfold configs)"
            + (f"; to rerun this run: --config {rd.config_file}" if rd.config_file.is_file() else "")
        )
    cfg = _read_config(config_path, check=False)  # checked below unless it is the config a complete run ran
    may_be_unchanged = force is None and rd.manifest_file.is_file()
    if not may_be_unchanged:
        _check_config(cfg, config_path)
    if cfg.pretrain:
        if cfg.checkpoint or cfg.pretrained:
            raise VitfoldError("config: 'pretrain' makes the backbone weights; drop 'checkpoint'/'pretrained'")
        cfg.checkpoint = str(pretrained_path(cfg))
    _echo(f"run directory: {rd.path}  (backbone {cfg.backbone}, method {cfg.method}, data {cfg.data})")
    started = time.perf_counter()
    unchanged = None
    if may_be_unchanged:  # nothing to do is told without torch, timm or ONNX
        with rd.locked():
            unchanged = pipeline_unchanged(rd, cfg.to_yaml())
    if unchanged is not None:
        for name in unchanged:
            _echo(f"== {name}: up to date, skipped")
        outcome = dict.fromkeys(unchanged, "up to date")
    else:
        from vitfold.pipeline.stages.pipeline import run_pipeline

        if may_be_unchanged:  # not checked above
            _check_config(cfg, config_path)
        outcome = run_pipeline(rd, cfg, force, log=_echo, trust=trust)
    ran = [name for name, what in outcome.items() if what != "up to date"]
    _echo(
        f"done in {time.perf_counter() - started:.1f} s; ran: {', '.join(ran) or 'nothing (all up to date)'}; "
        f"report: {rd.report}"
    )
    if not read_manifest(rd)["stages"].get("verify", {}).get("passed", True):
        _echo(f"verify FAILED: see {rd.verify_dir / 'verify.md'}")
        sys.exit(1)


@main.command()
@click.argument("name", required=False)
def configs(name: str | None) -> None:
    """List the run configs that ship with vitfold, or print config NAME (to copy and edit it).

    Run one by name: vitfold run --config demo --out runs/demo
    """
    from vitfold.pipeline.config import config_file, shipped_configs

    if name is not None:
        click.echo(config_file(name).read_text(), nl=False)
        return
    for shipped in shipped_configs():
        click.echo(shipped)
