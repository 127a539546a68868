"""The library front: the README's "Library" example runs as written, and the front stays cheap."""

from __future__ import annotations

import doctest
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_readme_library_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the example names tests/data/... relative to the repository
    text = _section((ROOT / "README.md").read_text(), "Library")
    test = doctest.DocTestParser().get_doctest(text, {}, "README.md#library", "README.md", 0)
    assert len(test.examples) >= 10, "the Library example lost its doctest"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


@pytest.mark.parametrize("module", ["qevm", "qevm.units"])
def test_module_doctests(module: str) -> None:
    import importlib

    res = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert res.failed == 0


def test_front() -> None:
    import tomllib

    import qevm
    from qevm.errors import QevmError

    assert set(qevm.__all__) <= set(dir(qevm))
    for name in qevm.__all__:
        getattr(qevm, name)
    assert issubclass(qevm.DecodeError, QevmError) and qevm.QevmError is QevmError
    with pytest.raises(AttributeError):
        qevm.no_such_thing  # noqa: B018
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "qevm.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", qevm.__version__)


def test_leaf_import_is_cheap() -> None:
    """``import qevm.errors`` loads neither the reader nor the parser (the front is lazy)."""
    code = ("import sys, qevm.errors, qevm.units; "
            "print(sorted(m for m in sys.modules if m.startswith('qevm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "['qevm', 'qevm.errors', 'qevm.units']"
