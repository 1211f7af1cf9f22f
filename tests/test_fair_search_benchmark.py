"""benchmarks/fair_search.py runs both policies on a shrunken demo and reports each."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fair_search_quick_reports_both_policies(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("fair_search", REPO / "benchmarks/fair_search.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "fair.json"
    module.main(["--quick", "--json", str(out), "--threads", "1"])
    results = json.loads(out.read_text())
    assert set(results) == {"old", "fair"}
    (fair,) = results["fair"]
    assert sum(fair["states"].values()) == 4
    # the first round gives every batch size a trial, and the floor lets each complete
    assert all(count >= 1 for count in fair["complete_per_batch_size"].values())
    assert fair["epochs_trained"] > 0 and fair["alpha"] is not None
