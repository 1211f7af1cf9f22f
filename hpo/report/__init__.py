"""Tables and figures from a finished or running study (being split into modules)."""

from hpo.report.analysis import *  # noqa: F403
from hpo.report.analysis import (  # noqa: F401
    ATTACHED_PREFIX,
    FIGURE_NAMES,
    attach_report,
    collect,
    fit_lr_scaling,
    run_report,
    summarize,
    summary_markdown,
    write_report,
)
