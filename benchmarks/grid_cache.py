"""The cache file of ``prediction_quality.py``'s grid: its values per config, its key (the
grid study, seeds and numerics), and rows of another grid's cache joined to it
(``--grid-also``). Sibling of ``prediction_quality.py`` (not a package)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from hpo.spec import StudySpec


def merged_rows(values: dict, path: Path, base: StudySpec, seeds: int) -> dict:
    """``values`` with the weight-decay rows of another grid's cache (``--grid-also``): the
    same study, batch sizes, LRs and numerics, other weight decays only (a grid run from a
    copy of the study file with another weight-decay range). Each config's first ``seeds``
    values. Refused (exit with the reason) where anything else differs, where a weight
    decay is in both, or where it has fewer seeds."""
    stored = json.loads(path.read_text())
    key = {"spec": json.loads(base.to_json()), "numerics": stored["key"].get("numerics")}
    if _without_decays(stored["key"]) != _without_decays(key):
        raise SystemExit(f"{path} holds another grid (study, LRs or numerics differ)")
    if stored["key"]["seeds"] < seeds:
        raise SystemExit(f"{path} has {stored['key']['seeds']} seeds, fewer than {seeds}")
    decays = stored["key"]["spec"]["sampler"]["grid_weight_decay"]
    more = cached_values(stored, decays[0])
    if {wd for _, _, wd in more} & {wd for _, _, wd in values}:
        raise SystemExit(f"{path} repeats weight decays of --grid-cache")
    if {c[:2] for c in more} != {c[:2] for c in values}:
        raise SystemExit(f"{path} has other batch sizes or LRs than --grid-cache")
    return values | {config: v[:seeds] for config, v in more.items()}


def _without_decays(key: dict) -> dict:
    """A grid key without its weight decays (range, grid values and the trial count they
    set), its seeds and the fields ``_comparable`` ignores."""
    key = comparable(key, offline=False)
    for table, name in (("search", "weight_decay_low"), ("search", "weight_decay_high")):
        key["spec"].get(table, {}).pop(name, None)
    key["spec"].get("sampler", {}).pop("grid_weight_decay", None)
    key["spec"].get("budget", {}).pop("n_trials", None)
    key["spec"].pop("name", None)
    return key


def cached_values(stored: dict, decay: float) -> dict[tuple[int, float, float], list[float]]:
    """A cache's values keyed (batch size, lr, weight decay): a single-weight-decay cache
    stores (batch size, lr) rows, its weight decay is the grid's only one."""
    if "values" not in stored:
        return {(int(b), float(lr), decay): [v] for b, lr, v in stored["mean"]}
    return {
        (int(row[0]), float(row[1]), float(row[2]) if len(row) == 4 else decay): list(row[-1])
        for row in stored["values"]
    }


def write_cache(cache: Path, key: dict, values: dict, with_decay: bool) -> None:
    """The grid's key, mean and each seed's value per config; (batch size, lr) rows when
    the grid has one weight decay, as caches were before the weight-decay axis. Seeds
    added at single configs (``grid_cells``) are kept."""
    rows = sorted(values.items())
    width = 3 if with_decay else 2
    mean = [[*config[:width], statistics.mean(v)] for config, v in rows]
    each = [[*config[:width], v] for config, v in rows]
    stored = {"key": key, "mean": mean, "values": each}
    if cache.is_file() and "seed_values" in (before := json.loads(cache.read_text())):
        stored["seed_values"] = before["seed_values"]
    cache.write_text(json.dumps(stored, indent=1))


def comparable(key: dict, offline: bool) -> dict:
    """A grid key without the fields a config's value does not depend on: its seeds, the
    search's replicates, and ``gpus_per_trial`` unset (one device, as 1 is); without the numerics when
    ``offline``."""
    key = json.loads(json.dumps(key))
    key.pop("seeds", None)  # a cache with other seeds is cut or extended
    key["spec"].get("search", {}).pop("replicates", None)
    training = key["spec"].get("training", {})
    training["gpus_per_trial"] = training.get("gpus_per_trial") or 1
    if offline:
        key.pop("numerics", None)
    return key
