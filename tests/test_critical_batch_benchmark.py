"""benchmarks/critical_batch.py: the study's steps-to-target B_crit against a dense grid, both
run through ``hpo launch``, on a shrunken demo (one search seed: the pipeline, not the
figure, which docs/benchmarks.md gives for three)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benchmark_scripts import load_benchmark


def test_critical_batch_quick_compares_the_study_with_the_grid_at_its_target(
    tmp_path: Path,
) -> None:
    module = load_benchmark("critical_batch")
    out = tmp_path / "critical.json"
    module.main(["--quick", "--search-seeds", "1", "--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["grid"] == {"lrs": 2, "seeds": 1, "configs": 6}  # 3 batch sizes x 2 LRs
    (seed,) = result["seeds"]
    assert seed["target"] is not None and len(seed["steps"]) >= 2
    assert seed["grid_steps"]  # the grid's steps at the study's own target
    # inside: True/False when the grid reaches the target at two or more batch sizes, else
    # None (a 2-LR grid on 256 patches often does not): the pipeline is what is tested here
    assert seed["inside"] in (True, False, None)
    assert (seed["inside"] is None) == (seed["grid_b_crit"] is None or seed["interval"][0] is None)
