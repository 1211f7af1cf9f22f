"""Tables and figures from a finished or running study. Trains nothing.

What a batch-size study is for is a handful of pictures a generic HPO dashboard does not
draw: the objective over the batch size × learning-rate plane, how the best learning rate
scales with batch size (lr* ∝ B^α, against the linear rule α = 1 and the square-root rule
α = 0.5), the generalization gap per batch size, learning curves coloured by batch size,
parameter importances, the gradient noise scale B_simple against the LR ridge (the
critical batch size), and the cost view (value vs time to train with its Pareto front:
which batch size gets close to the best for less). ``write_report`` writes them as PNG (matplotlib) and interactive
HTML (plotly) with a markdown summary; ``attach_report`` puts the same figures, the PNGs
and the summary on the study so optuna-dashboard shows them.

Data flows one way, one module each:

- ``analysis``: pure analysis of the trials (``collect`` → ``ReportData``); draws nothing.
  ``summary`` (the best trial per batch size), ``scaling`` (the α fit), ``noise_scale``
  and ``cost`` are pure analysis too, one concept each.
- ``figures``: one figure model per figure, every drawn number computed there (the α band
  once, for both renderers); a package with one module per topic.
- ``plotly_render``, ``png_render``: thin renderers that only draw a figure model.
- ``table``: the best-per-batch-size table as text cells (``hpo status`` uses it too).
- ``markdown``: the summary; ``files``: ``write_report``; ``attach``: the dashboard;
  ``run``: ``load_study_for_report`` and ``run_report`` (what ``hpo report`` does).

Only COMPLETE and PRUNED trials are drawn; RUNNING, WAITING and FAIL trials are ignored, so a
report of a running study is a snapshot.
"""

from __future__ import annotations

from hpo.report.analysis import (
    DEFAULT_CONFIDENCE,
    DEFAULT_TOP_K,
    BatchSizeRow,
    ReportData,
    ScalingFit,
    StudySummary,
    TrialPoint,
    collect,
    fit_lr_scaling,
    importances,
    summarize,
    trial_batch_size,
    trial_points,
)
from hpo.report.attach import ATTACHED_PREFIX, attach_report
from hpo.report.cost import DEFAULT_COST_TOLERANCE, CostView, cost_view
from hpo.report.figures import FIGURE_NAMES, FIGURE_TITLES, FigureModel, figure_models
from hpo.report.files import Report, write_report
from hpo.report.markdown import summary_markdown
from hpo.report.plotly_render import plotly_figure
from hpo.report.png_render import png_figure
from hpo.report.run import load_study_for_report, run_report
from hpo.report.table import batch_size_table

__all__ = [
    "ATTACHED_PREFIX",
    "DEFAULT_COST_TOLERANCE",
    "CostView",
    "cost_view",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_TOP_K",
    "FIGURE_NAMES",
    "FIGURE_TITLES",
    "BatchSizeRow",
    "FigureModel",
    "Report",
    "ReportData",
    "ScalingFit",
    "StudySummary",
    "TrialPoint",
    "attach_report",
    "batch_size_table",
    "collect",
    "figure_models",
    "fit_lr_scaling",
    "importances",
    "load_study_for_report",
    "plotly_figure",
    "png_figure",
    "run_report",
    "summarize",
    "summary_markdown",
    "trial_batch_size",
    "trial_points",
    "write_report",
]
