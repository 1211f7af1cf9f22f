"""``StudySpec``, the whole study file: its top-level fields and the checks across tables,
its node-local fields and how a node overrides them, and its JSON form stored on the study.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import Field, ValidationError, model_validator

from hpo.settings import NodeSettings
from hpo.spec.errors import (
    JSON_TOKENS,
    MAX_NESTING,
    SpecError,
    format_validation_error,
    too_deep,
)
from hpo.spec.fields import MAX_NAME_LENGTH, Seed, Table
from hpo.spec.tables import (
    BudgetSpec,
    DatasetSpec,
    ModelSpec,
    ObjectiveSpec,
    PrunerSpec,
    SamplerSpec,
    SearchSpec,
    TrackingSpec,
    TrainerSpec,
    TrainingSpec,
)

STUDY_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")

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


class StudySpec(Table):
    name: str = Field(max_length=MAX_NAME_LENGTH)
    seed: Seed = 0
    # Both required by hpo's built-in trainer; optional with ``[trainer] function``.
    dataset: DatasetSpec | None = None
    model: ModelSpec | None = None
    search: SearchSpec
    budget: BudgetSpec
    pruner: PrunerSpec = PrunerSpec()
    sampler: SamplerSpec = SamplerSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    training: TrainingSpec = TrainingSpec()
    trainer: TrainerSpec = TrainerSpec()
    tracking: TrackingSpec = TrackingSpec()

    @property
    def builtin_trainer(self) -> bool:
        """Whether trials run hpo's own CNN loop (no ``[trainer] function``)."""
        return self.trainer.function is None

    @model_validator(mode="after")
    def _check_cross_fields(self) -> StudySpec:
        if not STUDY_NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} must match [a-z0-9][a-z0-9_-]*")
        for table in ("dataset", "model"):
            if self.builtin_trainer and getattr(self, table) is None:
                raise ValueError(
                    f"[{table}] is missing: hpo's built-in trainer needs it "
                    '(or set [trainer] function = "package.module:function")'
                )
        self._check_extras()
        train_size = self.dataset.known_train_size() if self.dataset is not None else None
        if train_size is not None and self.search.batch_size_max > train_size:
            raise ValueError(
                f"search.batch_size_max = {self.search.batch_size_max} is larger than the "
                f"training set ({train_size} patches)"
            )
        gpus = self.training.gpus_per_trial
        if self.search.batch_size_min % gpus:
            raise ValueError(
                f"training.gpus_per_trial = {gpus} must divide search.batch_size_min = "
                f"{self.search.batch_size_min} (each device trains batch_size / {gpus})"
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

    def _check_extras(self) -> None:
        """Extras are for a user's trainer; a grid can only hold extras with choices."""
        if self.search.extra and self.builtin_trainer:
            first = next(iter(self.search.extra))
            raise ValueError(
                f"search.extra.{first}: hpo's built-in trainer has no use for extra "
                'parameters; set [trainer] function = "package.module:function" to use them'
            )
        if self.sampler.kind == "grid":
            for name, param in self.search.extra.items():
                if param.kind != "categorical":
                    raise ValueError(
                        f"search.extra.{name}: a grid study needs choices = [...] for every "
                        "extra parameter (a range has no grid points)"
                    )

    def on_node(self, node: NodeSettings) -> StudySpec:
        """The spec as this node runs it: its node-local fields replaced where ``node``
        sets them (never stored, never compared; see ``NODE_LOCAL_FIELDS``)."""
        dataset: dict[str, Any] = {}
        training: dict[str, Any] = {}
        if (
            node.data_root is not None
            and self.dataset is not None
            and self.dataset.kind != "synthetic"
        ):
            dataset["root"] = node.data_root
        if node.device is not None:
            training["device"] = node.device
        if node.num_threads is not None:
            training["num_threads"] = node.num_threads
        if node.checkpoint_dir is not None:
            training["checkpoint_dir"] = node.checkpoint_dir
        tracking = self.tracking
        if node.mlflow_uri is not None and tracking.mlflow is None:  # --track
            tracking = tracking.model_copy(update={"mlflow": node.mlflow_uri})
        return self.model_copy(
            update={
                "dataset": self.dataset and self.dataset.model_copy(update=dataset),
                "training": self.training.model_copy(update=training),
                "tracking": tracking,
            }
        )

    def to_json(self) -> str:
        """The canonical JSON form stored on the Optuna study."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str, *, source: str = "stored spec") -> StudySpec:
        """The spec stored on a study. Raises SpecError naming ``source`` when it no longer
        validates (written by an older hpo, or by hand)."""
        if too_deep(text, JSON_TOKENS) is not None:
            raise SpecError(
                f"{source} is not a JSON study spec (nested more than {MAX_NESTING} deep)"
            )
        try:
            return cls.model_validate(json.loads(text))
        except ValidationError as error:
            raise SpecError(
                f"{source} no longer validates: {format_validation_error(error)} "
                "(create a new study from a corrected study file)"
            ) from None
        except (TypeError, ValueError) as error:
            raise SpecError(f"{source} is not a JSON study spec ({error})") from None
