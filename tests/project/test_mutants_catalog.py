"""`make mutants` (not part of `make test`) plants each mutant by a text replacement: a refactor that moves a
mutant's text would stop it at that mutant. Each text is checked here, in the suite, instead."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_mutant_text_occurs_once_in_its_file():
    spec = importlib.util.spec_from_file_location("mutant_catalog", ROOT / "tests" / "mutants" / "catalog.py")
    catalog = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = catalog  # its dataclass looks its module up there
    spec.loader.exec_module(catalog)
    counts = {m.name: (ROOT / m.file).read_text().count(m.find) for m in catalog.MUTANTS}
    assert len(counts) == len(catalog.MUTANTS), "two mutants share a name"
    assert {name: n for name, n in counts.items() if n != 1} == {}
    for m in catalog.MUTANTS:
        tested = {t.split("::")[0] for t in m.tests}
        assert all((ROOT / t).is_file() for t in tested), f"{m.name}: a test file it names is missing"
