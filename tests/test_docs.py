"""The README and docs stay true to the Makefile, CI and each other: the drift a reader trips over
first (a `make` target that does not exist, a benchmark list that is not what `make bench` runs, two
pages stating different suite times, CI not running what the README promises)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def makefile_targets() -> dict[str, str]:
    """target -> its recipe (the indented lines under it)."""
    targets: dict[str, str] = {}
    current = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([a-z][a-z0-9-]*):", line)
        if m:
            current = m.group(1)
            targets[current] = ""
        elif line.startswith("\t") and current:
            targets[current] += line.strip() + "\n"
        elif line and not line.startswith(("\t", "#")):
            current = None
    return targets


def test_readme_starts_with_the_two_commands():
    first = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    targets = makefile_targets()
    assert "-m slime.train +experiment=agentic" in targets["demo"]
    assert "-m pytest" in targets["test"]


def test_ci_runs_the_readme_test_command_and_lint():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M) and re.search(r"^make lint$", ci, re.M)
    assert "lint-imports" in makefile_targets()["lint"]  # the layer contract, not only ruff


def test_every_make_target_the_docs_name_exists():
    targets = makefile_targets()
    # `make X` in code spans, and lines of code blocks that start with it (prose "make a" is not one)
    pattern = re.compile(r"(?:`|^|\$ )(?:[A-Z_]+=\S+ )*make ([a-z][a-z0-9-]*)\b", re.M)
    named = {(p.name, t) for p in DOCS for t in pattern.findall(p.read_text())}
    missing = sorted((doc, t) for doc, t in named if t not in targets)
    assert not missing, missing


def test_make_bench_is_described_as_it_runs():
    ran = re.findall(r"-m (benchmarks\.[a-z_]+)", makefile_targets()["bench"])
    assert ran and all(importlib.util.find_spec(m) is not None for m in ran)
    readme = README.read_text()
    paragraph = readme[readme.index("`make bench` runs") :].split("\n\n", 1)[0]
    assert sorted(re.findall(r"`(benchmarks\.[a-z_]+)`", paragraph)) == sorted(ran)


SUITE_TIME = re.compile(r"(suite|make test)[^\n]{0,80}?\b\d+(-\d+)? ?min", re.I)


def test_one_page_states_the_suite_time():
    stating = sorted(p.name for p in DOCS if SUITE_TIME.search(p.read_text()))
    assert stating == ["testing.md"], stating
