"""Best-so-far curves of studies side by side: by finished trial and by running time, a table,
and one self-contained plotly page.

Wall time is the search's running time: from the first trial's start, with parallel workers
counted once and the work between trials (sampling, the tuner's bookkeeping) included, but pauses
of a minute or more between trials (the time between two invocations of a resumed study) left out.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from studies.storage.study import ENGINE

if TYPE_CHECKING:
    import optuna


@dataclass
class Curve:
    """Best value so far of one study, by finished trial and by running time."""

    name: str
    engine: str
    metric: str
    direction: str  # minimize | maximize
    trial_numbers: list[int] = field(default_factory=list)  # x: the n-th finished trial (1-based)
    seconds: list[float] = field(default_factory=list)  # x: running time when it finished
    best: list[float] = field(default_factory=list)  # y: best COMPLETE value so far (nan before the first)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def final(self) -> float:
        finite = [v for v in self.best if not math.isnan(v)]
        return finite[-1] if finite else math.nan

    def time_to_reach(self, target: float) -> float | None:
        """Running time until the best so far was at least as good as `target` (None: never)."""
        for t, v in zip(self.seconds, self.best, strict=True):
            if not math.isnan(v) and (v <= target if self.direction == "minimize" else v >= target):
                return t
        return None

    def mean_gap(self, reference: float, worst: float, budget: float) -> float:
        """The best so far's average distance from `reference` over the first `budget` seconds of
        running time (before the first value: `worst`'s distance). One number for the whole curve:
        a search that gets close early scores low even if another one ends a little better."""
        sign = 1.0 if self.direction == "minimize" else -1.0
        area, previous, gap = 0.0, 0.0, sign * (worst - reference)
        for t, v in zip(self.seconds, self.best, strict=True):
            if t >= budget:
                break
            area += gap * (t - previous)
            previous = t
            if not math.isnan(v):
                gap = sign * (v - reference)
        area += gap * max(budget - previous, 0.0)
        return area / budget if budget > 0 else math.nan


PAUSE_SECONDS = 60.0  # a gap this long between trials is a pause (another invocation), not search overhead


def busy_seconds(intervals: list[tuple[float, float]], pause: float = PAUSE_SECONDS) -> list[float]:
    """For (start, end) intervals sorted by end: the running time of the search at each end, i.e.
    the length of the union of the intervals so far plus the gaps between them shorter than
    `pause` (the sampler's or tuner's own work between two trials counts; the time between two
    invocations does not). Merged spans are kept sorted; a new interval swallows those it reaches."""
    spans: list[list[float]] = []
    total = 0.0
    out: list[float] = []
    for start, end in intervals:
        lo = start
        if spans and spans[-1][1] < start < spans[-1][1] + pause:
            lo = spans[-1][1]  # a short gap: the search was busy between these trials
        while spans and spans[-1][1] >= lo:  # overlaps (ends are sorted, so only the tail can)
            s, e = spans.pop()
            total -= e - s
            lo = min(lo, s)
        spans.append([lo, end])
        total += end - lo
        out.append(total)
    return out


def curve(study: optuna.Study, *, name: str | None = None, engine: str | None = None) -> Curve:
    """The best-so-far curve of a single-objective study, over its finished trials in the order they ended."""
    from optuna.trial import TrialState

    if len(study.directions) != 1:
        raise ValueError(f"study {study.study_name!r} has {len(study.directions)} objectives; compare needs one")
    direction = study.directions[0].name.lower()
    metric = (study.metric_names or ["value"])[0]
    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
                if t.datetime_start is not None and t.datetime_complete is not None]
    finished.sort(key=lambda t: (t.datetime_complete, t.number))
    out = Curve(name or study.study_name, engine or study.user_attrs.get(ENGINE, "optuna"), metric, direction)
    out.counts = {s: sum(t.state.name == s for t in finished) for s in ("COMPLETE", "PRUNED", "FAIL")}
    out.seconds = busy_seconds([(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in finished
                                if t.datetime_start is not None and t.datetime_complete is not None])  # all are (see above)
    best = math.nan
    for i, t in enumerate(finished, start=1):
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
            if math.isnan(best) or (t.value < best if direction == "minimize" else t.value > best):
                best = t.value
        out.trial_numbers.append(i)
        out.best.append(best)
    return out


def figure(curves: list[Curve], title: str) -> Any:
    """Two panels, best so far against finished trials and against running time; one line per study."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("by finished trial", "by running time (s)"))
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
    for i, c in enumerate(curves):
        label = f"{c.name} ({c.engine})"
        style = {"color": palette[i % len(palette)]}
        ys = [None if math.isnan(v) else v for v in c.best]
        fig.add_trace(go.Scatter(x=c.trial_numbers, y=ys, name=label, legendgroup=label, line=style, line_shape="hv",
                                 mode="lines+markers", marker={"size": 4}), row=1, col=1)
        fig.add_trace(go.Scatter(x=c.seconds, y=ys, name=label, legendgroup=label, line=style, line_shape="hv",
                                 mode="lines+markers", marker={"size": 4}, showlegend=False), row=1, col=2)
    metric = curves[0].metric if curves else "value"
    direction = curves[0].direction if curves else "minimize"
    fig.update_yaxes(title_text=f"best {metric} so far ({direction})", row=1, col=1)
    fig.update_xaxes(title_text="finished trials", row=1, col=1)
    fig.update_xaxes(title_text="seconds of running trials", row=1, col=2)
    fig.update_layout(title=title, height=520, legend={"orientation": "h", "y": -0.2})
    return fig


def table(curves: list[Curve]) -> list[dict[str, Any]]:
    """One row per study: trials, final best, running time, and time to reach the others' best."""
    if not curves:
        return []
    direction = curves[0].direction
    finals = [c.final for c in curves if not math.isnan(c.final)]
    target = (max(finals) if direction == "minimize" else min(finals)) if finals else math.nan  # the worst final best
    rows = []
    for c in curves:
        rows.append({
            "study": c.name, "engine": c.engine, **{k.lower(): v for k, v in c.counts.items()},
            "best": c.final, "seconds": c.seconds[-1] if c.seconds else 0.0,
            "seconds_to_common_best": None if math.isnan(target) else c.time_to_reach(target),
        })
    return rows


def page(curves: list[Curve], title: str) -> str:
    rows = table(curves)
    head = ("study", "engine", "complete", "pruned", "fail", "best", "seconds", "seconds_to_common_best")

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "never" if math.isnan(value) else f"{value:.5g}"
        return "never" if value is None else html.escape(str(value))

    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k in head) + "</tr>" for r in rows)
    note = ("<p><code>seconds_to_common_best</code>: running time each study needed to reach the worst of the final "
            "best values, i.e. a value every study reached.</p>")
    chart = figure(curves, title).to_html(full_html=False, include_plotlyjs=True)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1>{chart}<table border='1' cellpadding='4'><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{body}</table>{note}</body></html>")


def summary_table(curves: list[Curve]) -> str:
    rows = table(curves)
    lines = [f"{'study':<28} {'engine':<22} {'trials':>6} {'best':>10} {'seconds':>8} {'to common best':>15}"]
    for r in rows:
        n = r.get("complete", 0) + r.get("pruned", 0) + r.get("fail", 0)
        reach = r["seconds_to_common_best"]
        lines.append(f"{r['study']:<28} {r['engine']:<22} {n:>6} {r['best']:>10.5g} {r['seconds']:>8.1f} "
                     f"{'never' if reach is None else f'{reach:.1f} s':>15}")
    return "\n".join(lines)

