"""The lab notebook stays out of the product.

Measurements are identified by their date and commit, and live in docs/performance.md and
benchmarks/results/; design reasoning in docs/design.md. So the code, the README and
pyproject.toml carry no diary labels (a work session's number, or result folders named after one), no
references to the old benchmarks/NOTES.md, and the code's comments no dated measurements (a date
in a .py file under mistral_jax/ or pallas_kernels/ is one: cite docs/performance.md instead).
The docs and benchmarks are checked for diary labels too. Plain file scans: no imports, no JAX.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SESSION = re.compile(r"\bsession\s+\d+\b", re.IGNORECASE)  # the word, a space, a number
SHORT_LABEL = re.compile(r"\bs\d{2}\b")  # "s21", "(s19)"
RESULT_LABEL = re.compile(r"20\d{2}-\d{2}-\d{2}_\w*?_s\d{2}(?!\d)")  # results/2026-12-04_h200_s21_host
NOTES = re.compile(r"NOTES\.md")
DATE = re.compile(r"\b20\d{2}-[01]\d-[0-3]\d\b")

CODE_DIRS = ("mistral_jax", "pallas_kernels")
PRODUCT_FILES = ("README.md", "pyproject.toml")
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".ini", ".json", ".ipynb"}


def _files(base: Path, suffixes=TEXT_SUFFIXES):
    if base.is_file():
        yield base
        return
    for path in sorted(base.rglob("*")):
        if path.is_file() and path.suffix in suffixes and "__pycache__" not in path.parts:
            yield path


def _scan(paths, patterns) -> list[str]:
    found = []
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(lines, 1):
            for name, pattern in patterns:
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: [{name}] {line.strip()[:160]}")
    return found


def _product_paths():
    for d in CODE_DIRS:
        yield from _files(ROOT / d)
    for f in PRODUCT_FILES:
        if (ROOT / f).exists():
            yield ROOT / f


def _report(found: list[str]) -> str:
    return f"{len(found)} line(s):\n" + "\n".join(found)


def test_no_diary_labels_in_code_readme_or_pyproject():
    found = _scan(_product_paths(), [("session label", SESSION), ("short label", SHORT_LABEL),
                                     ("result named by a label", RESULT_LABEL), ("NOTES.md", NOTES)])
    assert not found, _report(found)


def test_no_dated_measurements_in_code():
    paths = [p for d in CODE_DIRS for p in _files(ROOT / d, {".py"})]
    found = _scan(paths, [("date", DATE)])
    assert not found, _report(found)


def test_no_diary_labels_in_docs_and_benchmarks():
    """docs/ and benchmarks/ (scripts and READMEs; result data such as HLO dumps excepted) name
    measurements by date and commit too."""
    paths = list(_files(ROOT / "docs"))
    bench = ROOT / "benchmarks"
    paths += [p for p in _files(bench, {".py", ".sh", ".md"}) if "results" not in p.relative_to(bench).parts[:-1]]
    paths += list(_files(bench / "results", {".md"}))
    paths += [p for p in (bench / "results").iterdir()] if (bench / "results").exists() else []
    found = _scan([p for p in paths if p.is_file() and p.suffix in {".py", ".sh", ".md"}],
                  [("session label", SESSION), ("short label", SHORT_LABEL), ("result named by a label", RESULT_LABEL)])
    names = [str(p.relative_to(ROOT)) for p in (bench / "results").rglob("*")
             if RESULT_LABEL.search(p.name) or re.search(r"(?:^|_)s\d{2}(?:_|$|\.)", p.name)]
    assert not found and not names, _report(found + [f"{n}: [result named by a label]" for n in names])
