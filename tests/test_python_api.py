"""docs/python-api.md, executed: every ```python block in order, in one namespace, from a
directory holding examples/own-training (importable), as the page says."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "python-api.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)


def test_the_page_has_examples_for_launch_load_export_and_report() -> None:
    code = "\n".join(_blocks())
    for call in ("hpo.launch(", "hpo.load(", ".best", ".per_batch_size()", ".export(", ".report("):
        assert call in code


@pytest.mark.slow
def test_every_example_of_the_python_api_page_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(REPO / "examples" / "own-training", tmp_path / "examples" / "own-training")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "examples" / "own-training"))
    for name in ("HPO_STORAGE", "HPO_STUDIES_DIR", "HPO_CHECKPOINT_DIR"):
        monkeypatch.delenv(name, raising=False)
    namespace: dict[str, object] = {}
    for number, block in enumerate(_blocks(), start=1):
        exec(compile(block, f"{PAGE.name} block {number}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "reports" / "own-training" / "summary.md").is_file()


def test_importing_hpo_loads_neither_torch_nor_optuna() -> None:
    code = "import sys, hpo; hpo.launch; print('torch' in sys.modules, 'optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
