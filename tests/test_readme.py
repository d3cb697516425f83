"""The README's cheap commands, run as written, and the numbers it and docs/benchmarks.md state, checked
against what the code computes: `vitfold info` lines, the timm recipe for RUN/fold (on the tiny run),
the parameter counts, and the demo's split sizes."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from vitfold.cli import main
from vitfold.pipeline.data import ImageTransform, build_splits, parse_data_spec

ROOT = Path(__file__).resolve().parents[1]
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


# the adapter parameter counts the README states for ViT-B/16, per (method, rank) of an info command
STATED_COUNTS = {
    ("rlrr", None): _readme_count(r"ViT-B/16: ([\d,]+) adapter parameters"),
    ("efft2", "32"): _readme_count(r"EFFT2:.*?ViT-B/16 at r = 32: ([\d,]+) parameters"),
}


def test_the_readme_has_the_commands_this_file_runs():
    assert len(INFO_COMMANDS) == 3 and len([b for b in _blocks("python") if "local-dir:" in b]) == 1


@pytest.mark.parametrize("command", INFO_COMMANDS)
def test_readme_info_command_runs_and_prints_the_counts_the_readme_states(command):
    args = shlex.split(command)[1:]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    method = args[args.index("--method") + 1] if "--method" in args else "rlrr"
    rank = args[args.index("--rank") + 1] if "--rank" in args else None
    if "--json" in args and (method, rank) in STATED_COUNTS:
        assert json.loads(result.output)["adapter_params"] == STATED_COUNTS[method, rank]


def test_readme_timm_recipe_loads_a_finished_run_folder(exported_run):
    (recipe,) = [b for b in _blocks("python") if "local-dir:" in b]
    namespace: dict = {}
    exec(recipe.replace("runs/demo", str(exported_run)), namespace)  # noqa: S102 - the README's own code
    assert namespace["model"].num_classes == 5 and namespace["names"] == ["0", "1", "2", "3", "4"]
    assert namespace["config"]["input_size"] == (3, 16, 16)
    assert namespace["transform"] is not None


def test_benchmarks_md_states_the_demo_split_sizes_the_data_has():
    splits = build_splits(parse_data_spec("digits:5-9"), ImageTransform((16, 16), (0.5,) * 3, (0.5,) * 3))
    sizes = splits.describe()
    stated = f"{sizes['train']['images']} training / {sizes['eval']['images']} evaluation images"
    assert stated in " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())  # across line breaks
