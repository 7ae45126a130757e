"""Plotly reports of a study (optimisation history, importances, parallel coordinates,
intermediate values) as one self-contained HTML page."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

PLOTS = (
    ("Optimization history", "plot_optimization_history"),
    ("Parameter importances", "plot_param_importances"),
    ("Parallel coordinates", "plot_parallel_coordinate"),
    ("Intermediate values (best so far, per epoch)", "plot_intermediate_values"),
)


def study_report(study: optuna.Study, metric_names: list[str]) -> str:
    """The HTML page; a plot that cannot be drawn yet (too few trials) says why instead."""
    import warnings

    import optuna.visualization as vis

    sections, include_js = [], True
    single = len(study.directions) == 1
    for title, name in PLOTS:
        kwargs = {} if single or name == "plot_intermediate_values" else {"target": lambda t: t.values[0],
                                                                         "target_name": metric_names[0]}
        if single and name != "plot_intermediate_values":
            kwargs["target_name"] = metric_names[0]
        try:
            with warnings.catch_warnings():  # "too few trials" notes from the importance evaluator
                warnings.simplefilter("ignore")
                figure = getattr(vis, name)(study, **kwargs)
            figure.update_layout(title=title)
            body = figure.to_html(full_html=False, include_plotlyjs=include_js)
            include_js = False  # plotly.js is embedded once, so the page works offline
        except Exception as e:  # e.g. importances need two COMPLETE trials
            body = f"<p><em>{html.escape(title)}: not available ({html.escape(str(e) or type(e).__name__)})</em></p>"
        sections.append(f"<section><h2>{html.escape(title)}</h2>{body}</section>")
    heading = html.escape(f"Study {study.study_name}: {', '.join(metric_names)}")
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{heading}</title></head><body><h1>{heading}</h1>{''.join(sections)}</body></html>"
