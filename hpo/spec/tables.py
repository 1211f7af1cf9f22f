"""The study file's tables below the top level (dataset, model, search, budget, pruner,
sampler, objective, training), each with the checks that need only its own fields, and
``TrialParams``, one trial's values of the searched fields as training uses them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field, model_validator

from hpo.spec.extras import ExtraParam, ExtraValue, check_extra_names
from hpo.spec.fields import (
    MAX_EPOCHS,
    Count,
    FilePath,
    Float,
    IntIn,
    PositiveInt,
    Seed,
    Table,
)

# PatchCamelyon's published split sizes; a subset size larger than these is an error.
PCAM_SPLIT_SIZES = {"train": 262_144, "val": 32_768, "test": 32_768}


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and (value & (value - 1)) == 0


@dataclass(frozen=True)
class TrialParams:
    """One trial's searched hyperparameters, as training uses them."""

    batch_size: int
    lr: float
    weight_decay: float
    # Samples per forward/backward pass when ``batch_size`` is above the device's cap and
    # the study accumulates (``training.above_cap = "accumulate"``); None: one pass.
    micro_batch_size: int | None = None
    # The study file's ``[search.extra.NAME]`` values, by name (a user's trainer reads them
    # as ``ctx.params[NAME]``).
    extra: dict[str, ExtraValue] = field(default_factory=dict, hash=False)

    @property
    def log2_batch_size(self) -> int:
        return int(math.log2(self.batch_size))

    @property
    def accumulation_steps(self) -> int:
        """Forward/backward passes per optimizer update (1 without accumulation)."""
        return 1 if self.micro_batch_size is None else self.batch_size // self.micro_batch_size


class DatasetSpec(Table):
    """Where the patches come from.

    ``train_size``/``val_size`` take a seeded subset (the first N of a fixed permutation),
    which is how a study on PCam's 262,144 training patches is made to fit a budget.
    """

    kind: Literal["pcam", "synthetic", "imagefolder"]
    root: FilePath | None = None
    train_size: PositiveInt | None = None
    val_size: PositiveInt | None = None
    val_fraction: Float = Field(0.2, gt=0.0, lt=1.0)
    image_size: IntIn(16, 512) = 96
    cache_dir: FilePath | None = None
    seed: Seed = 0

    @model_validator(mode="after")
    def _check_root(self) -> DatasetSpec:
        if self.kind in ("pcam", "imagefolder") and self.root is None:
            raise ValueError(f"dataset kind {self.kind!r} needs 'root' (a directory)")
        if self.kind == "synthetic":
            if self.root is not None:
                raise ValueError("dataset kind 'synthetic' takes no 'root'")
            if self.train_size is None or self.val_size is None:
                raise ValueError("dataset kind 'synthetic' needs 'train_size' and 'val_size'")
            # Generated in memory (about 27 KB a patch): no larger than PCam itself.
            limit = PCAM_SPLIT_SIZES["train"] + PCAM_SPLIT_SIZES["val"]
            if self.train_size + self.val_size > limit:
                raise ValueError(
                    f"synthetic train_size + val_size = {self.train_size + self.val_size} "
                    f"exceeds {limit} patches"
                )
        if self.kind == "pcam":
            for split, size in (("train", self.train_size), ("val", self.val_size)):
                if size is not None and size > PCAM_SPLIT_SIZES[split]:
                    raise ValueError(
                        f"{split}_size {size} exceeds PCam's {split} split "
                        f"({PCAM_SPLIT_SIZES[split]} patches)"
                    )
        return self

    def known_train_size(self) -> int | None:
        """Training-set size when it is known without reading the data, else None."""
        if self.train_size is not None:
            return self.train_size
        if self.kind == "pcam":
            return PCAM_SPLIT_SIZES["train"]
        return None


MODEL_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")
FACTORY_PATTERN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class ModelSpec(Table):
    """What to train: ``name`` (``small-cnn`` or any classification model torchvision
    lists) or ``factory`` (``package.module:function``, the user's own, called as
    ``function(num_classes=N)``). Only the form is checked here, without torch; the commands
    that train check the model itself once (``hpo.models.check_model``)."""

    name: str | None = None
    factory: str | None = None
    pretrained: bool = False

    @model_validator(mode="after")
    def _check_one_source(self) -> ModelSpec:
        if (self.name is None) == (self.factory is None):
            raise ValueError("set exactly one of 'name' (e.g. \"resnet18\") and 'factory'")
        if self.name is not None and not MODEL_NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f'name {self.name!r} is not a model name (e.g. "resnet18")')
        if self.factory is not None:
            if not FACTORY_PATTERN.fullmatch(self.factory):
                raise ValueError(
                    f'factory {self.factory!r} must look like "package.module:function"'
                )
            if self.pretrained:
                raise ValueError("pretrained applies to 'name' only, not to 'factory'")
        return self


class TrainerSpec(Table):
    """Whose training loop a trial runs: hpo's built-in CNN loop (``function`` unset) or the
    user's ``function = "package.module:function"``, called as ``function(ctx)`` with an
    ``hpo.TrialContext`` and returning the trial's final metric. Only the form is checked
    here; the commands that train import it once before the first trial
    (``hpo.context.load_trainer``). With a function, ``dataset`` and ``model`` are the
    trainer's business and may be left out."""

    function: str | None = None

    @model_validator(mode="after")
    def _check_form(self) -> TrainerSpec:
        if self.function is not None and not FACTORY_PATTERN.fullmatch(self.function):
            raise ValueError(f'function {self.function!r} must look like "package.module:function"')
        return self


class TrackingSpec(Table):
    """Where trials are tracked besides the study: ``mlflow`` is an MLflow tracking URI
    (``http://host:5000``); one parent run per study, one nested run per trial
    (``hpo.tracking``; needs ``hpo[mlflow]`` on the nodes)."""

    mlflow: str | None = Field(None, min_length=1, max_length=2000)

    @model_validator(mode="after")
    def _check_no_credentials(self) -> TrackingSpec:
        # The spec is stored on the study as JSON, readable by every user of the database.
        if self.mlflow is not None and "@" in self.mlflow.partition("://")[2].split("/")[0]:
            raise ValueError(
                "mlflow: a tracking URI with credentials would be stored on the study; set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD on each node instead"
            )
        return self


class SearchSpec(Table):
    """The searched hyperparameters.

    Batch size is searched as the exponent ``log2_batch_size`` so the sampler treats it as
    ordered: 64 is between 32 and 128, which lets TPE learn neighbourhoods.
    """

    batch_size_min: PositiveInt
    batch_size_max: PositiveInt
    lr_low: Float = Field(gt=0.0)
    lr_high: Float = Field(gt=0.0)
    weight_decay_low: Float = Field(gt=0.0)
    weight_decay_high: Float = Field(gt=0.0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: Float = Field(0.9, ge=0.0, lt=1.0)
    # Extra seeds for the best configuration of each of the top two batch sizes, trained
    # once the search is nearly spent (``hpo.replicates``): the noise floor the report
    # compares the winner's margin with. 2 × replicates trials of the budget; none in a
    # grid study or where that is more than a third of the budget.
    replicates: Count = 1
    # ``[search.extra.NAME]``: more searched parameters for a user's trainer
    # (``hpo.spec.extras``), sampled after the three above in the file's order.
    extra: dict[str, ExtraParam] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_bounds(self) -> SearchSpec:
        check_extra_names(self.extra)
        for name in ("batch_size_min", "batch_size_max"):
            value = getattr(self, name)
            if not _is_power_of_two(value):
                raise ValueError(f"{name} = {value} is not a power of two (e.g. 16, 32, 64)")
        for low, high in (
            ("batch_size_min", "batch_size_max"),
            ("lr_low", "lr_high"),
            ("weight_decay_low", "weight_decay_high"),
        ):
            if getattr(self, low) >= getattr(self, high):
                raise ValueError(
                    f"{low} = {getattr(self, low)} must be less than {high} = {getattr(self, high)}"
                )
        return self

    @property
    def batch_sizes(self) -> list[int]:
        """Every power of two from the minimum to the maximum batch size."""
        low, high = int(math.log2(self.batch_size_min)), int(math.log2(self.batch_size_max))
        return [2**k for k in range(low, high + 1)]


# Reports per trial when ``budget.reports`` is not set and the unit is not epochs.
DEFAULT_REPORTS = 4


# The longest budget a field may ask for: a year (a typo of 1e12 s would overflow the
# clocks and deadlines computed from it).
MAX_SECONDS = 366 * 24 * 3600.0


class BudgetSpec(Table):
    """How much training each trial gets, and how many trials.

    ``unit`` says what "the same amount of training" means across batch sizes:

    - ``epochs`` (default): equal samples seen (``epochs`` passes over the training set);
      B = 512 then takes 32x fewer optimizer updates than B = 16.
    - ``steps``: equal optimizer updates (``steps``); large batches see more data (the
      "train longer" regime of Hoffer et al., 2017).
    - ``seconds``: equal training time (``seconds``, evaluation not counted); on a GPU
      large batches process more samples per second.

    Each trial reports its metric ``reports`` times, at fractions 1/reports, 2/reports, …
    of the budget in its unit, so the pruner compares trials at the same resource; the
    cosine LR schedule spans the budget in the same unit. Without ``reports`` a trial
    reports after every epoch (unit ``epochs``, as before) or ``DEFAULT_REPORTS`` times.
    """

    unit: Literal["epochs", "steps", "seconds"] = "epochs"
    epochs: PositiveInt | None = Field(None, le=MAX_EPOCHS)
    steps: PositiveInt | None = None
    seconds: Float | None = Field(None, gt=0, le=MAX_SECONDS)
    reports: PositiveInt | None = None
    n_trials: PositiveInt = 20
    timeout_s: Float | None = Field(None, gt=0, le=MAX_SECONDS)

    @model_validator(mode="after")
    def _check_unit(self) -> BudgetSpec:
        amounts = {"epochs": self.epochs, "steps": self.steps, "seconds": self.seconds}
        if amounts[self.unit] is None:
            raise ValueError(f"unit {self.unit!r} needs '{self.unit}' (the budget per trial)")
        for name, value in amounts.items():
            if name != self.unit and value is not None:
                raise ValueError(f"'{name}' is set but unit is {self.unit!r}; set one of them")
        if self.unit == "steps" and self.reports is not None and self.reports > (self.steps or 0):
            # A report between two updates would evaluate the same weights again (or none).
            raise ValueError(
                f"reports = {self.reports} is more than steps = {self.steps}: a trial "
                "reports at most once per optimizer update"
            )
        return self

    @property
    def amount(self) -> float:
        """The budget per trial in ``unit``."""
        return float(
            {"epochs": self.epochs, "steps": self.steps, "seconds": self.seconds}[self.unit] or 0
        )

    @property
    def report_count(self) -> int:
        """How many times each trial reports (and may be pruned)."""
        if self.reports is not None:
            return self.reports
        return self.epochs if self.unit == "epochs" and self.epochs else DEFAULT_REPORTS


class PrunerSpec(Table):
    """Early stopping of bad trials.

    Pruning compares trials at the same report (with ``budget.unit = "epochs"``, the same
    epoch, i.e. after the same number of samples). Large batches take fewer optimizer
    updates per epoch and so look worse early; three settings keep that from condemning a
    batch size wholesale:

    - ``min_epochs``, the warm-up: no trial is pruned before its report number
      ``min_epochs`` (Median/Percentile: ``n_warmup_steps``; successive halving and
      Hyperband: ``min_resource``, the first rung).
    - ``stratify_by_batch_size`` (not Hyperband): a trial is compared only with
      trials of its own batch size; ``n_startup_trials`` then counts per batch size.
    - ``min_trials_per_batch_size``, the floor: no trial is pruned while its batch size
      has fewer than this many complete trials.
    - ``compare_with_pruned`` (with ``stratify_by_batch_size``): the median/percentile at a
      report counts every trial of the batch size that reached it, PRUNED as well as
      COMPLETE, not only the complete survivors (``hpo.pruning``).
    - ``min_trials_at_report``: no pruning at a report fewer than this many compared trials
      reached (Optuna's ``n_min_trials``).

    The last two default off so a study file, or a study stored before they existed, keeps
    pruning exactly as before; the shipped study files turn them on.

    ``kind = "successive_halving"`` is Optuna's asynchronous successive halving: rungs at
    reports ``min_epochs`` × ``reduction_factor``^k; at each rung a trial goes on only if
    its value is in the top 1/``reduction_factor`` of every trial (complete, pruned or
    running) that reached that rung, so most trials stop at the first, cheap rung. With
    ``stratify_by_batch_size`` the rung's competitors are its own batch size's trials, so
    every batch size keeps a full-budget answer (``hpo.pruning``). It always compares with
    the pruned trials (``compare_with_pruned`` does not apply) and has no startup count
    (``n_startup_trials`` and ``min_trials_at_report`` do not apply; the floor
    ``min_trials_per_batch_size`` is its protection).

    ``kind = "catch_up"`` prunes a trial at a report only when it cannot plausibly catch
    up with the best complete value (of its batch size with ``stratify_by_batch_size``):
    its final value is forecast by a line through every complete trial's (value at that
    report, final value), and the trial is pruned only when the one-sided ``confidence``
    upper bound of that forecast's prediction interval stays below the best less
    ``near_best`` of it (``hpo.pruning.CatchUpPruner``). It needs no ranking at a report
    where a higher LR is still behind only for being noisier early. ``n_startup_trials``
    counts the complete trials the line needs (at least 3); ``compare_with_pruned`` and
    ``min_trials_at_report`` do not apply (pruned trials have no final value).
    """

    kind: Literal["median", "percentile", "catch_up", "successive_halving", "hyperband", "none"] = (
        "median"
    )
    min_epochs: PositiveInt = 2
    n_startup_trials: Count = 5
    # kind = "successive_halving" / "hyperband": η, the rungs' spacing and the fraction
    # (1/η) of a rung's trials that go on to the next.
    reduction_factor: IntIn(2, 1000) = 3
    # kind = "percentile": keep the top ``percentile`` % of the compared trials at each
    # report (Optuna's PercentilePruner; 50 is the median pruner, 75 prunes less).
    percentile: Float = Field(50.0, gt=0.0, lt=100.0)
    # kind = "catch_up": how sure the forecast must be that a trial cannot reach the best
    # before it is pruned (the one-sided upper prediction bound's level).
    confidence: Float = Field(0.975, ge=0.5, lt=1.0)
    # kind = "catch_up": a trial that may end within this share of its batch size's best is
    # kept (the report counts trials within 1% of the best as estimates of its best LR).
    near_best: Float = Field(0.01, ge=0.0, lt=1.0)
    stratify_by_batch_size: bool = False
    min_trials_per_batch_size: Count = 0
    compare_with_pruned: bool = False
    min_trials_at_report: PositiveInt = 1

    @model_validator(mode="after")
    def _check_stratify(self) -> PrunerSpec:
        if self.stratify_by_batch_size and self.kind == "hyperband":
            raise ValueError(
                "stratify_by_batch_size needs kind 'median', 'percentile', 'catch_up' or "
                "'successive_halving', not 'hyperband'"
            )
        if self.compare_with_pruned and self.kind == "successive_halving":
            raise ValueError(
                "compare_with_pruned does not apply to kind 'successive_halving', which "
                "always compares every trial that reached the rung; remove it"
            )
        if self.compare_with_pruned and self.kind == "catch_up":
            raise ValueError(
                "compare_with_pruned does not apply to kind 'catch_up', which compares with "
                "complete trials' final values (a pruned trial has none); remove it"
            )
        if self.compare_with_pruned and not self.stratify_by_batch_size:
            raise ValueError("compare_with_pruned needs stratify_by_batch_size = true")
        return self


class SamplerSpec(Table):
    """How trials are proposed.

    ``cover_batch_sizes`` queues a first round of one trial per batch size when the study
    is created (``hpo.space.first_round``), so every batch size is tried however the
    sampler's draws fall, and queues another (a lower LR, at most two more) for a batch
    size whose coverage trials all ended without a complete result
    (``hpo.study.keep_batch_sizes_covered``); off by default so existing study files draw
    as before. A grid
    covers every batch size by itself, so with ``kind = "grid"`` it is ignored.
    """

    kind: Literal["tpe", "gp", "random", "grid"] = "tpe"
    seed: Seed | None = 0
    n_startup_trials: Count = 8
    # Absent means "the default grid"; an empty list is an error, not silently replaced.
    grid_lr: list[Annotated[Float, Field(gt=0)]] | None = Field(None, min_length=1)
    grid_weight_decay: list[Annotated[Float, Field(gt=0)]] | None = Field(None, min_length=1)
    cover_batch_sizes: bool = False
    # LRs per batch size in that first round: the square-root rule's LR alone (1), or LRs a
    # factor 4 apart centred on it (2: ×½ and ×2), so the round brackets each batch size's
    # optimum instead of anchoring the fit to the rule's LR. With 2 or more, the weight
    # decays vary too (a Latin hypercube over LR and weight decay per batch size).
    first_round_lrs: int = Field(1, ge=1, le=4)


class ObjectiveSpec(Table):
    metric: Literal["val_auc", "val_acc", "val_loss"] = "val_auc"

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return "minimize" if self.metric == "val_loss" else "maximize"


# What each objective metric is past two classes (``hpo.train.evaluate`` computes them);
# with two classes each is the plain binary metric its name says.
MULTICLASS_METRICS = {
    "val_auc": "macro one-vs-rest AUC",
    "val_acc": "top-1 accuracy",
    "val_loss": "cross-entropy",
}


def describe_metric(metric: str, n_classes: int) -> str:
    """The objective's name, and past two classes what it is (``"val_auc: macro one-vs-rest
    AUC over 3 classes"``): the one wording ``hpo status``, the report and ``hpo export``
    use. A name hpo does not know (a study from another tool) stays as it is."""
    if n_classes <= 2 or metric not in MULTICLASS_METRICS:
        return metric
    return f"{metric}: {MULTICLASS_METRICS[metric]} over {n_classes} classes"


class TrainingSpec(Table):
    """How a trial trains on the device it gets.

    ``mixed_precision`` switches bf16 autocast (CPU with bf16 support, CUDA) or fp16 (older
    CUDA); ``channels_last`` switches the NHWC memory format. Both default on because on
    this project's reference CPU they gave 3.9x (small CNN) and 1.9x (ResNet-18).
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = True
    channels_last: bool = True
    eval_batch_size: IntIn(1, 65_536) = 512
    augment: bool = True
    # Per-sample, per-channel colour gain 1 ± s and offset ± s × 255 with augmentation on;
    # 0 turns it off, 0.05 is a light stain variation (hpo.data.color_jitter).
    color_jitter: Float = Field(0.0, ge=0.0, le=0.5)
    num_threads: PositiveInt | None = Field(None, le=4096)
    checkpoint_dir: FilePath | None = None
    # Epoch checkpoints written by a background thread from a host copy of the state, so
    # training goes on meanwhile (hpo.checkpoint.CheckpointWriter); false: each save
    # returns once the file is renamed (a kill then loses at most the epoch in progress).
    checkpoint_async: bool = True
    # A drawn batch size above the device's probed cap: "clamp" trains the cap instead (a
    # different point than the sampler asked for); "accumulate" trains the drawn batch
    # size as micro-batches at the cap with gradients accumulated (one optimizer update per
    # batch). BatchNorm then sees micro-batch statistics ("ghost batch norm").
    above_cap: Literal["clamp", "accumulate"] = "clamp"
    # torch.compile (inductor) on every trial's model. Off by default: on the reference CPU
    # the first compile took 55 s and the compiled small-cnn step was slower than eager
    # (0.48x, bf16; docs/benchmarks.md, benchmarks/compile.py). Turn it on only
    # where that benchmark shows a faster step and trials are long enough to repay it.
    # true is inductor's default mode; "reduce-overhead" adds CUDA graphs, for a GPU step
    # bound by the host launching kernels (benchmarks/gpu_step.py measures both).
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = False
    # Devices one trial trains on, data-parallel (hpo.distributed): N processes of one
    # torch.distributed group (NCCL on GPUs, gloo on CPU), each training batch_size / N
    # samples of every global batch. Must divide search.batch_size_min.
    gpus_per_trial: IntIn(1, 1024) = 1

    @property
    def compile_mode(self) -> str | None:
        """``torch.compile``'s mode for ``compile``: None for inductor's default."""
        return self.compile if self.compile in ("reduce-overhead", "max-autotune") else None
