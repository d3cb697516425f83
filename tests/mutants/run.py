"""`make mutants`: plant each mutant of catalog.py in a copy of the repository, run the tests meant to
kill it, and print a table (mutant, killed by, seconds). Exit 1 if any mutant survives.

The copy is the tracked and untracked-but-not-ignored files (the links `vitfold/pipeline` and `vitfold/export`
among them), so `import vitfold` resolves to the copy: it is first on PYTHONPATH, before the editable install
of the working tree.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from catalog import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[2]


def make_copy(dst: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in files:
        source = ROOT / name
        if source.is_symlink() or source.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dst / name, follow_symlinks=False)
    return dst


def run(mutant: Mutant, copy: Path, cache: Path) -> tuple[str, float]:
    """What killed `mutant` ('' if it survived) and how long its tests took."""
    target = copy / mutant.file
    original = target.read_text()
    if original.count(mutant.find) != 1:
        raise SystemExit(
            f"mutant '{mutant.name}': its text occurs {original.count(mutant.find)} times in {mutant.file}"
        )
    mutated = original.replace(mutant.find, mutant.replace)
    try:  # a mutant that does not compile would be "killed" by an import error, which proves nothing
        if target.suffix == ".py":
            compile(mutated, str(target), "exec")
    except SyntaxError as e:
        raise SystemExit(f"mutant '{mutant.name}' does not compile: {e}") from None
    target.write_text(mutated)
    env = {**os.environ, "PYTHONPATH": str(copy), "VITFOLD_CACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *mutant.tests],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        target.write_text(original)
    seconds = time.perf_counter() - started
    if result.returncode == 0:
        return "", seconds
    failed = re.search(r"^FAILED (\S+)", result.stdout, re.M)
    return (failed.group(1) if failed else f"pytest exit {result.returncode}"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only the mutants whose name contains this text")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.k.lower() in m.name.lower()]
    if not chosen:
        raise SystemExit(f"no mutant's name contains '{args.k}'")
    survived = []
    with tempfile.TemporaryDirectory(prefix="vitfold-mutants-") as tmp:
        copy = make_copy(Path(tmp) / "repo")
        print(f"{'mutant':55s} {'killed by':80s} {'seconds':>7s}")
        for mutant in chosen:
            killer, seconds = run(mutant, copy, Path(tmp) / "cache")
            print(f"{mutant.name:55s} {killer or 'SURVIVED':80s} {seconds:7.1f}", flush=True)
            if not killer:
                survived.append(mutant.name)
    print(
        f"{len(chosen) - len(survived)} of {len(chosen)} mutants killed"
        + (f"; survived: {survived}" if survived else "")
    )
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
