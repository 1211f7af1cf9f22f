"""The study file: its schema, where it is found, and errors that name the bad field.

A study file (``studies/NAME.toml``) is plain data validated by pydantic. Every table
forbids unknown keys, so a typo is an error instead of a silently ignored setting. The
validated spec is stored on the Optuna study as JSON, which is how remote workers learn
what to train without a copy of the file.

This package must not import torch or optuna: it is loaded by every command, including the
ones that only read a file. One concern per module, every public name re-exported here:

- ``fields``: the number and path types a value may have, and the base of every table.
- ``tables``: the tables below the top level (dataset, model, search, budget, pruner,
  sampler, objective, training, trainer) and ``TrialParams``.
- ``extras``: ``ExtraParam``, one ``[search.extra.NAME]`` table (a range or choices) for a
  user's trainer, and the rules for its name.
- ``study_file``: ``StudySpec``, the whole file: checks across tables, node-local fields
  and a node's overrides of them, the JSON form stored on the study.
- ``errors``: ``SpecError``, the one-line message naming each bad field, and the depth
  check that refuses deeply nested text before it is parsed.
- ``loading``: ``load_spec`` and ``resolve_study_path`` (a name or a path to a validated
  spec), ``check_data_root``, ``spec_differences``.
"""

from __future__ import annotations

from hpo.spec.errors import MAX_NESTING, SpecError
from hpo.spec.extras import RESERVED_PARAM_NAMES, ExtraParam, ExtraValue
from hpo.spec.fields import (
    MAX_EPOCHS,
    MAX_NAME_LENGTH,
    Count,
    FilePath,
    Float,
    Int,
    PositiveInt,
    Seed,
)
from hpo.spec.loading import (
    check_data_root,
    load_spec,
    parse_spec,
    resolve_study_path,
    spec_differences,
)
from hpo.spec.study_file import NODE_LOCAL_FIELDS, STUDY_NAME_PATTERN, StudySpec
from hpo.spec.tables import (
    DEFAULT_REPORTS,
    FACTORY_PATTERN,
    MODEL_NAME_PATTERN,
    MULTICLASS_METRICS,
    PCAM_SPLIT_SIZES,
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
    TrialParams,
    describe_metric,
)

__all__ = [
    "DEFAULT_REPORTS",
    "FACTORY_PATTERN",
    "MAX_EPOCHS",
    "MAX_NAME_LENGTH",
    "MAX_NESTING",
    "MODEL_NAME_PATTERN",
    "MULTICLASS_METRICS",
    "NODE_LOCAL_FIELDS",
    "PCAM_SPLIT_SIZES",
    "RESERVED_PARAM_NAMES",
    "STUDY_NAME_PATTERN",
    "BudgetSpec",
    "Count",
    "DatasetSpec",
    "ExtraParam",
    "ExtraValue",
    "FilePath",
    "Float",
    "Int",
    "ModelSpec",
    "ObjectiveSpec",
    "PositiveInt",
    "PrunerSpec",
    "SamplerSpec",
    "SearchSpec",
    "Seed",
    "SpecError",
    "StudySpec",
    "TrackingSpec",
    "TrainerSpec",
    "TrainingSpec",
    "TrialParams",
    "check_data_root",
    "describe_metric",
    "load_spec",
    "parse_spec",
    "resolve_study_path",
    "spec_differences",
]
