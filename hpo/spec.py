"""The study file: its schema, where it is found, and errors that name the bad field.

A study file (``studies/NAME.toml``) is plain data validated by pydantic. Every table
forbids unknown keys, so a typo is an error instead of a silently ignored setting. The
validated spec is stored on the Optuna study as JSON, which is how remote workers learn
what to train without a copy of the file.

This module must not import torch or optuna: it is loaded by every command, including the
ones that only read a file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)

from hpo.errors import UserError
from hpo.settings import STUDIES_DIR_ENV, NodeSettings, env

STUDY_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")

# PatchCamelyon's published split sizes; a subset size larger than these is an error.
PCAM_SPLIT_SIZES = {"train": 262_144, "val": 32_768, "test": 32_768}

# Fields that describe a node, not the study: where its files are, which device and how
# many threads it trains with. Each node may set its own (hpo.settings.NodeSettings), so
# they never count as a difference between a stored spec and a local one.
NODE_LOCAL_FIELDS = frozenset(
    {
        "dataset.root",
        "dataset.cache_dir",
        "training.device",
        "training.num_threads",
        "training.checkpoint_dir",
    }
)


class SpecError(UserError):
    """A study file or study name that cannot be used.

    The message is one line meant for the user: it names the file, the field and what is
    allowed. The CLI prints it and exits with code 2.
    """


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

    @property
    def log2_batch_size(self) -> int:
        return int(math.log2(self.batch_size))

    @property
    def accumulation_steps(self) -> int:
        """Forward/backward passes per optimizer update (1 without accumulation)."""
        return 1 if self.micro_batch_size is None else self.batch_size // self.micro_batch_size


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The one place that says what a number in a study file is. Strict: TOML's `true` is not
# the integer 1. Finite: JSON, in which the spec is stored on the study, has no inf/nan,
# so an infinite bound would be stored as null and the study could never be loaded again.
# Bounded: every count has a ceiling far above any real study, so a typo of 10**12 is a
# field error here instead of a crash (or a memory exhaustion) inside a worker.
Int = Annotated[int, Strict(), Field(ge=-(2**31), le=2**31 - 1)]
Count = Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)]
PositiveInt = Annotated[int, Strict(), Field(gt=0, le=2**31 - 1)]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
# numpy's and Optuna's samplers take seeds in [0, 2**32); a trial adds its number.
Seed = Annotated[int, Strict(), Field(ge=0, le=2**32 - 2**20)]
MAX_EPOCHS = 100_000
MAX_NAME_LENGTH = 100  # the name is part of file names (reports, checkpoints, cache)


def _usable_path(path: Path) -> Path:
    if "\x00" in str(path):
        raise ValueError("a path cannot contain a NUL character")
    if not str(path).strip():
        raise ValueError("a path cannot be empty")
    return path


FilePath = Annotated[Path, AfterValidator(_usable_path)]


class DatasetSpec(_Table):
    """Where the patches come from.

    ``train_size``/``val_size`` take a seeded subset (the first N of a fixed permutation),
    which is how a study on PCam's 262,144 training patches is made to fit a budget.
    """

    kind: Literal["pcam", "synthetic", "imagefolder"]
    root: FilePath | None = None
    train_size: PositiveInt | None = None
    val_size: PositiveInt | None = None
    val_fraction: Float = Field(0.2, gt=0.0, lt=1.0)
    image_size: Int = Field(96, ge=16, le=512)
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


class ModelSpec(_Table):
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


class SearchSpec(_Table):
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

    @model_validator(mode="after")
    def _check_bounds(self) -> SearchSpec:
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


class BudgetSpec(_Table):
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
    seconds: Float | None = Field(None, gt=0)
    reports: PositiveInt | None = None
    n_trials: PositiveInt = 20
    timeout_s: Float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_unit(self) -> BudgetSpec:
        amounts = {"epochs": self.epochs, "steps": self.steps, "seconds": self.seconds}
        if amounts[self.unit] is None:
            raise ValueError(f"unit {self.unit!r} needs '{self.unit}' (the budget per trial)")
        for name, value in amounts.items():
            if name != self.unit and value is not None:
                raise ValueError(f"'{name}' is set but unit is {self.unit!r}; set one of them")
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


class PrunerSpec(_Table):
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
    reduction_factor: Int = Field(3, ge=2, le=1000)
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


class SamplerSpec(_Table):
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
    # optimum instead of anchoring the fit to the rule's LR.
    first_round_lrs: int = Field(1, ge=1, le=4)


class ObjectiveSpec(_Table):
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


class TrainingSpec(_Table):
    """How a trial trains on the device it gets.

    ``mixed_precision`` switches bf16 autocast (CPU with bf16 support, CUDA) or fp16 (older
    CUDA); ``channels_last`` switches the NHWC memory format. Both default on because on
    this project's reference CPU they gave 3.9x (small CNN) and 1.9x (ResNet-18).
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = True
    channels_last: bool = True
    eval_batch_size: PositiveInt = Field(512, le=65_536)
    augment: bool = True
    # Per-sample, per-channel colour gain 1 ± s and offset ± s × 255 with augmentation on;
    # 0 turns it off, 0.05 is a light stain variation (hpo.data.color_jitter).
    color_jitter: Float = Field(0.0, ge=0.0, le=0.5)
    num_threads: PositiveInt | None = Field(None, le=4096)
    checkpoint_dir: FilePath | None = None
    # A drawn batch size above the device's probed cap: "clamp" trains the cap instead (a
    # different point than the sampler asked for); "accumulate" trains the drawn batch
    # size as micro-batches at the cap with gradients accumulated (one optimizer update per
    # batch). BatchNorm then sees micro-batch statistics ("ghost batch norm").
    above_cap: Literal["clamp", "accumulate"] = "clamp"
    # torch.compile (inductor) on every trial's model. Off by default: on the reference CPU
    # the first compile took 55 s and the compiled small-cnn step was slower than eager
    # (0.48x, bf16; docs/benchmarks.md, issue 13, benchmarks/compile.py). Turn it on only
    # where that benchmark shows a faster step and trials are long enough to repay it.
    # true is inductor's default mode; "reduce-overhead" adds CUDA graphs, for a GPU step
    # bound by the host launching kernels (benchmarks/gpu_step.py measures both).
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = False

    @property
    def compile_mode(self) -> str | None:
        """``torch.compile``'s mode for ``compile``: None for inductor's default."""
        return self.compile if self.compile in ("reduce-overhead", "max-autotune") else None


class StudySpec(_Table):
    name: str = Field(max_length=MAX_NAME_LENGTH)
    seed: Seed = 0
    dataset: DatasetSpec
    model: ModelSpec
    search: SearchSpec
    budget: BudgetSpec
    pruner: PrunerSpec = PrunerSpec()
    sampler: SamplerSpec = SamplerSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    training: TrainingSpec = TrainingSpec()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> StudySpec:
        if not STUDY_NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} must match [a-z0-9][a-z0-9_-]*")
        train_size = self.dataset.known_train_size()
        if train_size is not None and self.search.batch_size_max > train_size:
            raise ValueError(
                f"search.batch_size_max = {self.search.batch_size_max} is larger than the "
                f"training set ({train_size} patches)"
            )
        reports = self.budget.report_count
        if self.pruner.kind != "none" and self.pruner.min_epochs > reports:
            counted = (
                f"budget.epochs = {reports}"
                if self.budget.unit == "epochs" and self.budget.reports is None
                else f"budget.reports = {reports}"
            )
            raise ValueError(f"pruner.min_epochs = {self.pruner.min_epochs} exceeds {counted}")
        grids = (
            ("grid_lr", self.search.lr_low, self.search.lr_high),
            ("grid_weight_decay", self.search.weight_decay_low, self.search.weight_decay_high),
        )
        for field, low, high in grids:
            values = getattr(self.sampler, field)
            for value in values or []:
                if not low <= value <= high:
                    raise ValueError(f"sampler.{field} value {value} is outside [{low}, {high}]")
        return self

    def on_node(self, node: NodeSettings) -> StudySpec:
        """The spec as this node runs it: its node-local fields replaced where ``node``
        sets them (never stored, never compared; see ``NODE_LOCAL_FIELDS``)."""
        dataset: dict[str, Any] = {}
        training: dict[str, Any] = {}
        if node.data_root is not None and self.dataset.kind != "synthetic":
            dataset["root"] = node.data_root
        if node.device is not None:
            training["device"] = node.device
        if node.num_threads is not None:
            training["num_threads"] = node.num_threads
        if node.checkpoint_dir is not None:
            training["checkpoint_dir"] = node.checkpoint_dir
        return self.model_copy(
            update={
                "dataset": self.dataset.model_copy(update=dataset),
                "training": self.training.model_copy(update=training),
            }
        )

    def to_json(self) -> str:
        """The canonical JSON form stored on the Optuna study."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str, *, source: str = "stored spec") -> StudySpec:
        """The spec stored on a study. Raises SpecError naming ``source`` when it no longer
        validates (written by an older hpo, or by hand)."""
        if _too_deep(text, _JSON_TOKENS) is not None:
            raise SpecError(
                f"{source} is not a JSON study spec (nested more than {MAX_NESTING} deep)"
            )
        try:
            return cls.model_validate(json.loads(text))
        except ValidationError as error:
            raise SpecError(
                f"{source} no longer validates: {_format_validation_error(error)} "
                "(create a new study from a corrected study file)"
            ) from None
        except (TypeError, ValueError) as error:
            raise SpecError(f"{source} is not a JSON study spec ({error})") from None


def _shown(value: object, limit: int = 60) -> str:
    """A value from the file as it may appear in a one-line message: repr, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False)[:5]:
        location = ".".join(
            str(part) if re.fullmatch(r"[A-Za-z0-9_]+", str(part)) else _shown(part)
            for part in item["loc"]
        )
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (not a field of this table)"
        elif item["type"] in ("literal_error", "int_type", "float_type", "bool_type"):
            message = f"got {_shown(item['input'])}; {message[0].lower()}{message[1:]}"
        parts.append(f"{location}: {message}" if location else message)
    more = len(error.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def resolve_study_path(study: str, studies_dir: Path | None = None) -> Path:
    """Find the study file for ``--study``.

    ``study`` is a name (``histo`` → ``$HPO_STUDIES_DIR/histo.toml`` or
    ``./studies/histo.toml``) or a path ending in ``.toml``. Names are restricted to
    ``[a-z0-9][a-z0-9_-]*`` so a name can never walk out of the studies directory.
    """
    if study.endswith(".toml"):
        path = Path(study)
    else:
        if not STUDY_NAME_PATTERN.fullmatch(study):
            raise SpecError(
                f"study name {study!r} is not allowed: use [a-z0-9][a-z0-9_-]* "
                "or a path ending in .toml"
            )
        directory = studies_dir or Path(env(STUDIES_DIR_ENV) or "studies")
        path = directory / f"{study}.toml"
    if not path.is_file():
        raise SpecError(f"{path}: study file not found")
    return path


def parse_spec(data: dict[str, Any], *, source: str, default_name: str) -> StudySpec:
    """Validate a parsed study table; ``source`` names the file in error messages."""
    data = dict(data)
    data.setdefault("name", default_name)
    try:
        return StudySpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{source}: {_format_validation_error(error)}") from None


# A study file nests three tables deep at most. Text nested deeper is refused before it is
# parsed: tomllib and json recurse once per level, and a parser stopped by the recursion
# limit leaves no stack for anything else that runs at that depth (a garbage collector's
# finalizer then fails: "Exception ignored in ...").
MAX_NESTING = 32
_TOML_TOKENS = re.compile(
    r'#[^\n]*|"""(?:\\.|[^\\])*?"""|'
    + r"'''.*?'''|"
    + r'"(?:\\.|[^"\\\n])*"|'
    + r"'[^'\n]*'|[\[\]{}]",
    re.DOTALL,
)
_JSON_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|[\[\]{}]')


def _too_deep(text: str, tokens: re.Pattern[str]) -> int | None:
    """The line on which brackets or braces outside strings and comments first nest more
    than MAX_NESTING deep, or None. It counts without parsing, so it needs no stack."""
    depth = 0
    for match in tokens.finditer(text):
        bracket = match.group()
        if bracket in ("[", "{"):
            depth += 1
            if depth > MAX_NESTING:
                return text.count("\n", 0, match.start()) + 1
        elif bracket in ("]", "}"):
            depth = max(depth - 1, 0)
    return None


def load_spec(
    study: str | Path, studies_dir: Path | None = None, *, check_paths: bool = True
) -> StudySpec:
    """Load and validate a study file by name or path; raises SpecError with one clear line.

    ``check_paths=False`` skips the check that ``dataset.root`` exists here, for a node
    that overrides the data root (``--data-root``); ``check_data_root`` checks it later.
    """
    path = resolve_study_path(str(study), studies_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise SpecError(f"{path}: cannot be read ({error.strerror})") from None
    line = _too_deep(text, _TOML_TOKENS)
    if line is not None:
        raise SpecError(
            f"{path}: not a study file (nested more than {MAX_NESTING} deep on line {line})"
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: not valid TOML ({error})") from None
    spec = parse_spec(data, source=str(path), default_name=path.stem)
    if check_paths:
        check_data_root(spec, source=str(path))
    return spec


def check_data_root(spec: StudySpec, *, source: str) -> None:
    """Raise SpecError unless the spec's ``dataset.root`` (if any) is a directory here and
    its ``dataset.cache_dir`` (if any) is not something else than a directory."""
    root = spec.dataset.root
    if root is not None and not root.is_dir():
        raise SpecError(f"{source}: dataset.root: directory {str(root)!r} does not exist")
    cache = spec.dataset.cache_dir
    if cache is not None and cache.exists() and not cache.is_dir():
        raise SpecError(f"{source}: dataset.cache_dir: {str(cache)!r} is not a directory")


def spec_differences(a: StudySpec, b: StudySpec) -> list[str]:
    """Dotted names of the fields where two specs differ (for 'local spec differs' errors).

    Node-local fields (``NODE_LOCAL_FIELDS``) are not compared: they may differ per node.
    """

    def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                out.update(flatten(item, f"{prefix}{key}."))
            return out
        return {prefix.rstrip("."): value}

    left = flatten(json.loads(a.to_json()))
    right = flatten(json.loads(b.to_json()))
    keys = (left.keys() | right.keys()) - NODE_LOCAL_FIELDS
    return sorted(key for key in keys if left.get(key) != right.get(key))
