"""The README's cheap commands, run as written, and the numbers it and docs/benchmarks.md state, checked
against what the code computes: `vitfold info` lines, the timm recipe for RUN/fold (on the tiny run),
the parameter counts, and the demo's split sizes."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from click.testing import CliRunner

from vitfold.cli import main
from vitfold.pipeline.data import ImageTransform, build_splits, parse_data_spec

from helpers import CLASS_NAMES, ROOT

README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands(prefix: str) -> list[str]:
    """Lines of the README's bash blocks that start with `prefix`, without their trailing comment."""
    lines = [line for block in _blocks("bash") for line in block.splitlines()]
    return [line.split("  #")[0].strip() for line in lines if line.startswith(prefix)]


INFO_COMMANDS = _commands("vitfold info ")


def _readme_count(pattern: str) -> int:
    return int(re.search(pattern, README, flags=re.S).group(1).replace(",", ""))


def _key(args: list[str]) -> tuple[str, str, str | None, tuple[str, ...]]:
    """(backbone, method, rank, -o options) of an info command's arguments."""
    flags = ("--backbone", "--method", "--rank")
    value = {flag: args[args.index(flag) + 1] if flag in args else None for flag in flags}
    options = tuple(args[i + 1] for i, a in enumerate(args) if a == "-o")
    return value["--backbone"], value["--method"] or "rlrr", value["--rank"], options


# the adapter parameter counts the README states, per (backbone, method, rank, options) of an info command
STATED_COUNTS = {
    ("vit_base_patch16_224", "rlrr", None, ()): _readme_count(r"ViT-B/16: ([\d,]+) adapter parameters"),
    ("vit_base_patch16_224", "efft2", "32", ("init=vu",)): _readme_count(
        r"EFFT2:.*?ViT-B/16 at r = 32: ([\d,]+) parameters"
    ),
    ("swin_base_patch4_window7_224", "rlrr", None, ("reduction_shift=true",)): _readme_count(
        r"\*\*([\d,]+)\*\* with `-o reduction_shift=true`"
    ),
}


def test_the_readme_has_the_commands_this_file_runs():
    assert set(STATED_COUNTS) <= {_key(shlex.split(c)[1:]) for c in INFO_COMMANDS}
    assert len([b for b in _blocks("python") if "local-dir:" in b]) == 1


@pytest.mark.parametrize("command", INFO_COMMANDS)
def test_readme_info_command_runs_and_prints_the_counts_the_readme_states(command):
    args = shlex.split(command)[1:]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    if "--json" in args and _key(args) in STATED_COUNTS:
        assert json.loads(result.output)["adapter_params"] == STATED_COUNTS[_key(args)]


def test_readme_timm_recipe_loads_a_finished_run_folder(exported_run):
    (recipe,) = [b for b in _blocks("python") if "local-dir:" in b]
    namespace: dict = {}
    exec(recipe.replace("runs/demo", str(exported_run)), namespace)  # noqa: S102 - the README's own code
    assert namespace["model"].num_classes == 5 and namespace["names"] == CLASS_NAMES
    assert namespace["config"]["input_size"] == (3, 16, 16)
    assert namespace["transform"] is not None


def test_benchmarks_md_states_the_demo_split_sizes_the_data_has():
    splits = build_splits(parse_data_spec("digits:5-9"), ImageTransform((16, 16), (0.5,) * 3, (0.5,) * 3))
    sizes = splits.describe()
    stated = f"{sizes['train']['images']} training / {sizes['eval']['images']} evaluation images"
    assert stated in " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())  # across line breaks
