"""``write_report``: the report as files (PNG and HTML per figure, ``summary.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from hpo.atomic import atomic_dir
from hpo.report.analysis import DEFAULT_CONFIDENCE, DEFAULT_TOP_K, ReportData, collect
from hpo.report.cost import DEFAULT_COST_TOLERANCE
from hpo.report.figures import FIGURE_NAMES, figure_models
from hpo.report.markdown import summary_markdown
from hpo.report.plotly_render import plotly_figure
from hpo.report.png_render import png_figure

if TYPE_CHECKING:
    import plotly.graph_objects as go


@dataclass(frozen=True)
class Report:
    """What ``write_report`` produced. ``figures`` are the plotly figures, kept so that
    ``attach_report`` can put them on the study without drawing them again."""

    data: ReportData
    out_dir: Path
    files: list[Path]
    figures: dict[str, go.Figure]

    @property
    def summary_path(self) -> Path:
        return self.out_dir / "summary.md"

    def png(self, name: str) -> Path:
        return self.out_dir / f"{name}.png"


def write_report(
    study: optuna.Study,
    out_dir: Path,
    metric: str = "objective",
    *,
    top_k: int = DEFAULT_TOP_K,
    confidence: float = DEFAULT_CONFIDENCE,
    cost_tolerance: float = DEFAULT_COST_TOLERANCE,
) -> Report:
    """Write every figure (``NAME.png`` and ``NAME.html``) and ``summary.md`` to ``out_dir``.

    Both files of a figure are drawn from one figure model, so they show the same numbers.
    The HTML files share one ``plotly.min.js`` written beside them, so they work offline.
    Everything is drawn into a staging directory first and moved into ``out_dir`` only
    when complete (``hpo.atomic``): an interruption or a full disk leaves no half report.
    """
    data = collect(study, metric, top_k=top_k, confidence=confidence, cost_tolerance=cost_tolerance)
    models = figure_models(data)
    names: list[str] = []
    figures: dict[str, go.Figure] = {}
    with atomic_dir(out_dir, "--out") as staging:
        for name in FIGURE_NAMES:
            figure = plotly_figure(models[name])
            figures[name] = figure
            figure.write_html(
                staging / f"{name}.html", include_plotlyjs="directory", full_html=True
            )
            png_figure(models[name]).savefig(staging / f"{name}.png")
            names += [f"{name}.png", f"{name}.html"]
        (staging / "summary.md").write_text(summary_markdown(data), encoding="utf-8")
        names.append("summary.md")
    files = [out_dir / name for name in names]
    return Report(data=data, out_dir=out_dir, files=files, figures=figures)
