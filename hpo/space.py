"""From a spec and an Optuna trial to concrete hyperparameters; samplers and pruners.

Batch size is sampled as the integer exponent ``log2_batch_size`` (ordered, so TPE and GP
see 32 as lying between 16 and 64); ``batch_size = 2 ** log2_batch_size`` is what training
uses. It is stored twice for people to read: as the user attr ``batch_size`` (the batch size
actually trained, after any device cap) and as the parameter ``batch_size`` with a
single-valued distribution (``BATCH_SIZE_PARAM``, see ``sample_params``), which is what
makes optuna-dashboard show it wherever it shows a trial's parameters. Learning rate and
weight decay are log-uniform. The three are coupled (the best LR grows with batch size, roughly
linearly or as its square root), which is why TPE runs with ``multivariate=True``.
"""

from __future__ import annotations

import math
import random
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.pruning import (
    BatchSizeFloorPruner,
    CatchUpPruner,
    FlooredHyperbandPruner,
    SameBatchSizePruner,
)
from hpo.retry import superseded_trials
from hpo.spec import ExtraParam, ExtraValue, StudySpec, TrialParams

BATCH_PARAM = "log2_batch_size"
# The batch size as a trial parameter, for display only: IntDistribution(B, B, log=True).
BATCH_SIZE_PARAM = "batch_size"

__all__ = [
    "BATCH_PARAM",
    "BATCH_SIZE_PARAM",
    "TrialParams",
    "grid_search_space",
    "grid_size",
    "make_pruner",
]
__all__ += ["first_round", "make_sampler", "sample_params", "coverage_retries"]
__all__ += ["first_round_weight_decays"]

# User attr of the trials queued to cover the batch-size axis (the first round and its
# retries), and the attempt number of a retry (the first round is attempt 0).
COVER_ATTR = "queued_by"
COVER_VALUE = "cover_batch_sizes"
COVER_ATTEMPT_ATTR = "cover_attempt"
# Retries per batch size after its first-round trial ends without a complete result: a
# bound, so a batch size that cannot train (diverges at every LR, above every cap) costs at
# most 1 + COVER_RETRIES trials and never loops.
COVER_RETRIES = 2
# Each retry's LR is the first round's times this, per attempt (two octaves lower): the
# usual way a first-round trial fails is divergence, an LR too high for its batch size.
COVER_LR_FACTOR = 0.25
# With ``sampler.first_round_lrs`` > 1, the first round's LRs at one batch size span this
# factor, evenly on a log scale (two octaves, ×½ … ×2 of the rule's LR: on the demo's task
# about the width of the top of the LR curve). More LRs refine the same bracket rather than
# widen it: 3 LRs are an octave apart, which bounds how well each optimum is located.
FIRST_ROUND_LR_SPAN = 4.0


def sample_params(trial: optuna.Trial, spec: StudySpec) -> TrialParams:
    """Ask the trial for (batch size, lr, weight decay) inside the spec's space.

    The sampler draws ``log2_batch_size``; the batch size then becomes the parameter
    ``batch_size`` too, suggested as ``IntDistribution(B, B, log=True)``. optuna-dashboard
    lists a trial's parameters (best-trial card, trial list, the table's ``Param`` columns,
    the slice/contour/rank/parallel-coordinate axes) but never a user attr among them, so
    this is the only way it shows "batch_size 16" there. No sampler ever sees it: Optuna
    takes a single-valued distribution's one value without asking the sampler, and the
    relative samplers' search spaces (TPE, GP) keep only distributions equal in every
    trial, which (B, B) for different B are not. Optuna's PED-ANOVA gives it importance 0
    (nothing spreads inside one value); ``hpo report`` leaves it out.
    """
    search = spec.search
    log2_batch_size = trial.suggest_int(
        BATCH_PARAM,
        int(math.log2(search.batch_size_min)),
        int(math.log2(search.batch_size_max)),
    )
    batch_size = 2**log2_batch_size
    # A FixedTrial (a configuration replayed: benchmarks, a notebook) stores nothing to
    # display, and it would refuse a parameter its dict does not name.
    if not isinstance(trial, optuna.trial.FixedTrial):
        trial.suggest_int(BATCH_SIZE_PARAM, batch_size, batch_size, log=True)
    lr = trial.suggest_float("lr", search.lr_low, search.lr_high, log=True)
    weight_decay = trial.suggest_float(
        "weight_decay", search.weight_decay_low, search.weight_decay_high, log=True
    )
    trial.set_user_attr("batch_size", batch_size)
    extra = {name: _suggest_extra(trial, name, param) for name, param in search.extra.items()}
    return TrialParams(batch_size=batch_size, lr=lr, weight_decay=weight_decay, extra=extra)


def _suggest_extra(trial: optuna.Trial, name: str, param: ExtraParam) -> ExtraValue:
    """One ``[search.extra.NAME]`` value, asked after hpo's own three: a study without
    extras draws exactly what it drew before they existed."""
    if param.kind == "categorical":
        assert param.choices is not None
        return trial.suggest_categorical(name, param.choices)
    assert param.low is not None and param.high is not None
    if param.kind == "int":
        step = int(param.step) if param.step is not None else 1
        return trial.suggest_int(name, int(param.low), int(param.high), step=step, log=param.log)
    return trial.suggest_float(
        name, float(param.low), float(param.high), step=param.step, log=param.log
    )


def _log_spaced(low: float, high: float, count: int) -> list[float]:
    if count == 1:
        return [math.sqrt(low * high)]
    step = (math.log(high) - math.log(low)) / (count - 1)
    inner = [math.exp(math.log(low) + i * step) for i in range(1, count - 1)]
    return [low, *inner, high]  # exact bounds: exp(log(x)) can land just outside the range


def grid_search_space(spec: StudySpec) -> dict[str, list[Any]]:
    """The full grid: every power-of-two batch size × the LR grid × the weight-decay grid
    × each extra parameter's choices (a grid study's extras all have choices: the spec
    refuses a range there).

    Without explicit ``sampler.grid_lr`` / ``grid_weight_decay`` the grid takes 3 LRs
    (both bounds and their geometric mean) and one weight decay (the geometric mean).
    """
    search = spec.search
    lrs = spec.sampler.grid_lr or _log_spaced(search.lr_low, search.lr_high, 3)
    decays = spec.sampler.grid_weight_decay or _log_spaced(
        search.weight_decay_low, search.weight_decay_high, 1
    )
    return {
        BATCH_PARAM: [int(math.log2(b)) for b in search.batch_sizes],
        "lr": sorted(lrs),
        "weight_decay": sorted(decays),
    } | {name: list(param.choices or []) for name, param in search.extra.items()}


def grid_size(spec: StudySpec) -> int:
    return math.prod(len(values) for values in grid_search_space(spec).values())


def first_round(spec: StudySpec) -> list[dict[str, float | int]]:
    """``sampler.first_round_lrs`` trials per batch size, smallest batch size first (one
    trial per batch size at each LR, lowest LR first): the trials queued when a study with
    ``sampler.cover_batch_sizes`` is created.

    Why a queued round rather than a sampler rule: TPE (and GP) draw the batch size
    jointly with the LR and can leave a batch size untried for a whole small study; a
    queued trial is tried whatever the sampler does, is visible as WAITING in ``hpo
    status`` and the dashboard, is the same for every worker (queued once, under the
    study lock) and works with every sampler. Together with
    ``pruner.min_trials_per_batch_size >= 1`` each batch size gets one full-budget trial.

    LR: the geometric middle of the range at the middle batch size, scaled by the
    square-root rule (halfway, on a log scale, between the linear rule and no dependence)
    and kept inside the range; with more than one LR per batch size, LRs evenly spaced on
    a log scale over a factor ``FIRST_ROUND_LR_SPAN`` centred on that one (2: ×½ and ×2;
    3: ×½, ×1, ×2). Measured on the demo: with the rule's LR alone, the best trial at the
    ends of the batch-size range was that round trial in every seed, so the α fit echoed
    the rule; with 2 LRs two octaves apart, each optimum is located only to within two
    octaves, which alone makes α's 95% interval 1.2 wide at five batch sizes.

    Weight decay: with one trial per batch size, the geometric middle of its range; with
    ``n`` trials, a Latin hypercube over (LR, weight decay) at each batch size: one weight
    decay in each of ``n`` equal strata of the log range (``first_round_weight_decays``),
    and the pairing with the LRs turns by one place from one batch size to the next (a
    Latin square), so no LR is always tried with the same weight decay: the report can give
    a best weight decay per batch size and its timescale τ, which a round at one weight
    decay cannot.
    """
    count = spec.sampler.first_round_lrs
    decays = first_round_weight_decays(spec)
    rounds = []
    for index in range(count):
        share = index / (count - 1) - 0.5 if count > 1 else 0.0
        factor = FIRST_ROUND_LR_SPAN**share
        for position, params in enumerate(round_at_the_rule(spec)):
            lr = min(spec.search.lr_high, max(spec.search.lr_low, float(params["lr"]) * factor))
            weight_decay = decays[position][(index + position) % count]
            trial = {**params, "lr": lr, "weight_decay": weight_decay}
            if trial not in rounds:  # two LRs clamped to the same end of a narrow range
                rounds.append(trial)
    return rounds


def first_round_weight_decays(spec: StudySpec) -> list[list[float]]:
    """Each batch size's first-round weight decays (smallest batch size first; per batch
    size lowest first, one per trial there), with ``n = sampler.first_round_lrs`` trials
    per batch size and K batch sizes: the log range is cut into ``n`` equal strata and each
    of those into K sub-strata; in every stratum the batch sizes take its K sub-strata in
    an order drawn from ``sampler.seed``, each at its centre. So every batch size tries
    one weight decay per stratum (a decade apart with 2 on the demo's two decades), and the
    round as a whole tries n·K different ones, a Latin hypercube over the round: the best
    λ found at neighbouring batch sizes is not the same one or two values everywhere, which
    would leave each batch size's λ, and the timescale τ from it, located only to the
    strata's width, nor does the order tie the values to the batch size (no trend in B
    planted in τ). Another seed draws another order. One trial per batch size: the range's
    geometric middle."""
    count = spec.sampler.first_round_lrs
    sizes = len(spec.search.batch_sizes)
    low, high = math.log(spec.search.weight_decay_low), math.log(spec.search.weight_decay_high)
    if count == 1:
        return [[math.sqrt(spec.search.weight_decay_low * spec.search.weight_decay_high)]] * sizes
    draw = random.Random(f"first-round-weight-decays-{spec.sampler.seed}")
    orders = [draw.sample(range(sizes), sizes) for _ in range(count)]
    return [
        [
            min(
                spec.search.weight_decay_high,
                max(
                    spec.search.weight_decay_low,
                    math.exp(
                        low + (high - low) * (k + (orders[k][position] + 0.5) / sizes) / count
                    ),
                ),
            )
            for k in range(count)
        ]
        for position in range(sizes)
    ]


def round_at_the_rule(spec: StudySpec) -> list[dict[str, float | int]]:
    """One trial per batch size at the square-root rule's LR (see ``first_round``): the
    base every coverage retry lowers its LR from."""
    search = spec.search
    log2_sizes = [int(math.log2(b)) for b in search.batch_sizes]
    middle = (log2_sizes[0] + log2_sizes[-1]) / 2
    lr_middle = math.sqrt(search.lr_low * search.lr_high)
    weight_decay = math.sqrt(search.weight_decay_low * search.weight_decay_high)
    return [
        {
            BATCH_PARAM: log2,
            "lr": min(search.lr_high, max(search.lr_low, lr_middle * 2 ** ((log2 - middle) / 2))),
            "weight_decay": weight_decay,
        }
        for log2 in log2_sizes
    ]


def coverage_retries(
    spec: StudySpec, trials: list[FrozenTrial], room: int
) -> list[tuple[dict[str, float | int], int]]:
    """Trials to queue so that coverage holds: for each batch size with no COMPLETE trial,
    nothing RUNNING or WAITING at it, and fewer than ``1 + COVER_RETRIES`` coverage trials
    so far, one more trial (params, attempt number), smallest batch size first, at most
    ``room`` of them (the trials the study's budget still allows).

    A failed trial that was re-queued is left out: its retry counts in its place. The
    retry's LR is the first round's × ``COVER_LR_FACTOR`` ** attempt, kept inside the
    range; weight decay as in the first round. Pure: the caller (``hpo.study``) queues
    them under the study lock, so every worker sees the same trials and a need is met
    once (the queued trial is WAITING, then RUNNING, at that batch size: no second one).
    A batch size is read from the trial's params, or for a WAITING trial from its fixed
    params: the batch size the study asked for, so a trial clamped to a device's cap
    still counts for the batch size it was queued at.
    """
    if room <= 0:
        return []
    # A trial stopped and re-queued (a stop signal, a vanished worker) is no attempt: its
    # retry carries its coverage attrs (hpo.retry.PARAMETER_ATTRS) and counts in its place.
    superseded = superseded_trials(trials)
    by_batch: dict[int, list[FrozenTrial]] = {}
    for trial in trials:
        if trial.number in superseded:
            continue
        log2 = _asked_batch_exponent(trial)
        if log2 is not None:
            by_batch.setdefault(int(log2), []).append(trial)
    pending = (TrialState.RUNNING, TrialState.WAITING)
    retries = []
    for first in round_at_the_rule(spec):
        mine = by_batch.get(int(first[BATCH_PARAM]), [])
        if any(_completed(t) or t.state in pending for t in mine):
            continue
        attempt = sum(t.user_attrs.get(COVER_ATTR) == COVER_VALUE for t in mine)
        if attempt > COVER_RETRIES:
            continue
        lr = max(spec.search.lr_low, float(first["lr"]) * COVER_LR_FACTOR**attempt)
        retries.append(({**first, "lr": lr}, attempt))
    return retries[:room]


def coverage_may_need(spec: StudySpec, finished: list[FrozenTrial]) -> bool:
    """False only when ``coverage_retries`` is sure to queue nothing, judged from the
    study's *finished* trials alone (a read that skips the RUNNING ones: at hundreds of
    workers, reading those under the study lock at every claim was the claim's main cost).

    Every batch size has at least one trial from the first round on (queued with the
    study; a re-queued one is replaced by its retry at the same batch size). A need at a
    batch size means none of its trials is pending or completed, so all of them ended,
    and at least one ended without a result. So: a need is possible only at a batch size
    where a finished trial ended without a complete result and none completed.
    """
    if not spec.sampler.cover_batch_sizes or spec.sampler.kind == "grid":
        return False
    ended_without: set[int] = set()
    completed: set[int] = set()
    for trial in finished:
        log2 = _asked_batch_exponent(trial)
        if log2 is not None:
            (completed if _completed(trial) else ended_without).add(int(log2))
    return bool(ended_without - completed)


def _asked_batch_exponent(trial: FrozenTrial) -> int | float | None:
    """The trial's ``log2_batch_size``: sampled, or for a queued trial not yet sampled its
    fixed params (the batch size the study asked for); None when it has neither."""
    return trial.params.get(
        BATCH_PARAM, trial.system_attrs.get("fixed_params", {}).get(BATCH_PARAM)
    )


def _completed(trial: FrozenTrial) -> bool:
    return (
        trial.state == TrialState.COMPLETE
        and trial.value is not None
        and math.isfinite(trial.value)
    )


def make_sampler(spec: StudySpec, *, parallel: bool = False) -> optuna.samplers.BaseSampler:
    """The spec's Optuna sampler. ``parallel`` turns on TPE's constant liar, so workers
    sharing a study do not all propose the point that looks best while the others are
    still running. (Workers wrap it in ``hpo.caps.BatchSizeCapSampler``.)"""
    config = spec.sampler
    if config.kind == "tpe":
        return optuna.samplers.TPESampler(
            seed=config.seed,
            n_startup_trials=config.n_startup_trials,
            multivariate=True,
            group=False,
            constant_liar=parallel,
        )
    if config.kind == "gp":
        return optuna.samplers.GPSampler(seed=config.seed, n_startup_trials=config.n_startup_trials)
    if config.kind == "random":
        return optuna.samplers.RandomSampler(seed=config.seed)
    return optuna.samplers.GridSampler(grid_search_space(spec), seed=config.seed)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The spec's pruner, with the warm-up that protects large batches early on.

    Intermediate values are reported at step = report number (1-based; with
    ``budget.unit = "epochs"`` and the default reports, the epoch). ``min_epochs`` becomes
    the Median/Percentile pruner's ``n_warmup_steps`` (no pruning at steps below it) and
    successive halving's and Hyperband's ``min_resource`` (their first rung).
    ``stratify_by_batch_size`` (with ``compare_with_pruned``) and
    ``min_trials_per_batch_size`` wrap it (``hpo.pruning``); ``min_trials_at_report`` is
    Optuna's ``n_min_trials``. ``catch_up`` takes ``stratify_by_batch_size`` itself (its
    target is the batch size's best; its margin comes from every complete trial).
    """
    config = spec.pruner
    if config.kind == "hyperband":
        return _hyperband_pruner(spec)
    pruner = _compared_pruner(spec)
    if pruner is None:
        return optuna.pruners.NopPruner()
    if config.stratify_by_batch_size and config.kind != "catch_up":
        pruner = SameBatchSizePruner(pruner, BATCH_PARAM, include_pruned=config.compare_with_pruned)
    if config.min_trials_per_batch_size > 0:
        pruner = BatchSizeFloorPruner(
            pruner,
            BATCH_PARAM,
            config.min_trials_per_batch_size,
            # successive halving's rung records are what later trials compete with
            consult_when_protected=config.kind == "successive_halving",
        )
    return pruner


def _compared_pruner(spec: StudySpec) -> optuna.pruners.BasePruner | None:
    """The median, percentile, catch-up or successive-halving pruner of the spec, before
    ``make_pruner`` wraps it; None for the other kinds."""
    config = spec.pruner
    pruner: optuna.pruners.BasePruner
    if config.kind == "median":
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=config.n_startup_trials,
            n_warmup_steps=config.min_epochs,
            n_min_trials=config.min_trials_at_report,
        )
    elif config.kind == "percentile":
        pruner = optuna.pruners.PercentilePruner(
            config.percentile,
            n_startup_trials=config.n_startup_trials,
            n_warmup_steps=config.min_epochs,
            n_min_trials=config.min_trials_at_report,
        )
    elif config.kind == "catch_up":
        # Stratified by its own target (the batch size's best), not by a filtered view:
        # its margin is read from every complete trial of the study.
        pruner = CatchUpPruner(
            BATCH_PARAM if config.stratify_by_batch_size else None,
            n_warmup_steps=config.min_epochs,
            n_startup_trials=max(3, config.n_startup_trials),
            confidence=config.confidence,
            near_best=config.near_best,
        )
    elif config.kind == "successive_halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=config.min_epochs, reduction_factor=config.reduction_factor
        )
    else:
        return None
    return pruner


def _hyperband_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """Hyperband with ``min_epochs`` as its first rung, over the trial's reports; with
    ``min_trials_per_batch_size``, the variant that keeps that floor itself."""
    config = spec.pruner
    hyperband = {
        "min_resource": config.min_epochs,
        "max_resource": spec.budget.report_count,
        "reduction_factor": config.reduction_factor,
    }
    if config.min_trials_per_batch_size > 0:
        return FlooredHyperbandPruner(
            param=BATCH_PARAM, min_complete=config.min_trials_per_batch_size, **hyperband
        )
    return optuna.pruners.HyperbandPruner(**hyperband)
