"""`vitfold` command line: a click group of thin commands. Heavy imports happen inside commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.errors import VitfoldError


class _UserError(click.ClickException):
    """A `VitfoldError` shown as one line, exiting with its code (2: input error)."""

    def __init__(self, error: VitfoldError) -> None:
        super().__init__(str(error))
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


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Run config (YAML).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run directory.")
def run(config_path: str | None, out: str) -> None:
    """Run the pipeline stages that exist into the run directory OUT; name the ones still missing."""
    from pipeline.config import load_config
    from pipeline.run import STAGES, atomic_write_json, atomic_write_text
    from pipeline.selfcheck import fold_check

    if config_path is not None and not Path(config_path).is_file():
        raise VitfoldError(f"config file not found: {config_path}")
    cfg = load_config(config_path)
    run_dir = Path(out)
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    click.echo(f"run directory: {run_dir}  (backbone {cfg.backbone}, method {cfg.method})")
    check = fold_check(cfg)
    atomic_write_json(run_dir / "check" / "fold_check.json", check)
    worst = max(row["folded_vs_unmerged"] for row in check["results"])
    click.echo(f"fold check (random adapter values): folded vs unmerged max rel. error {worst:.2e}")
    click.echo(f"stages not implemented yet: {', '.join(STAGES)}")


if __name__ == "__main__":
    sys.exit(main())
