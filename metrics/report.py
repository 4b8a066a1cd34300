"""A self-contained HTML report of an evaluation: metric tables, inline-SVG plots, per-job images.

Nothing is fetched when the page opens: styles are inline, plots are SVG written here, and images
are either embedded as base64 thumbnails (JPEG for photos, PNG for masks) or copied next to the
report (`<name>_files/`) and linked relatively. The input is the dict `train.evaluate` writes to metrics.json.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

from PIL import Image

from dreamsteer.data.files import write_text_atomic
from dreamsteer.metrics.evaluator import AREAS, METRICS
from dreamsteer.metrics.toy_edit import TOY_METRICS

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
CARD_METRICS = ("clip_t", "clip_r", "clip_i", "l1", "lpips_alex", "ssim", "masked_clip")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f5f5f5}td.l,th.l{text-align:left}.muted{color:#888}.warn{color:#a15c00}
.plots{display:flex;flex-wrap:wrap;gap:12px}.job{border:1px solid #ddd;border-radius:6px;padding:10px;margin:12px 0}
.imgs{display:flex;flex-wrap:wrap;gap:10px}.imgs figure{margin:0;font-size:12px;max-width:260px}
.imgs img{display:block;max-width:256px;border:1px solid #ccc;image-rendering:auto}
.prompt{font-size:13px;margin:2px 0}.small{font-size:12px}details{margin:8px 0}
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(target, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * magnitude >= raw:
            return factor * magnitude
    return 10 * magnitude


def _ticks(lo: float, hi: float) -> list[float]:
    step = _nice_step(hi - lo)
    first = math.ceil(lo / step - 1e-9) * step
    count = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [first + i * step for i in range(count)]


def _range(values: Sequence[float], fixed: Optional[tuple[float, float]]) -> tuple[float, float]:
    if fixed:
        return fixed
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 0.5
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.08
    return lo - pad, hi + pad


def _svg_frame(width: int, height: int, title: str, left: float, plot_w: float, py: Callable[[float], float], y_ticks: Sequence[float]) -> list[str]:
    """An SVG chart's opening: the white canvas, its title, and the y axis' grid lines and tick labels."""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{_esc(title)}</text>',
    ]
    for t in y_ticks:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" font-size="11">{_esc(f"{t:.4g}")}</text>')
    return parts


def svg_line_chart(
    series: Sequence[tuple[str, Sequence[float], Sequence[Optional[float]]]],
    title: str,
    x_label: str,
    y_label: str,
    y_range: Optional[tuple[float, float]] = None,
    marker_x: Optional[float] = None,
    width: int = 520,
    height: int = 320,
) -> str:
    """An SVG line chart; None values break a line. `marker_x` draws a dashed vertical line."""
    left, right, top, bottom = 60, 16, 30, 46
    legend_h = 16 * len(series)
    height += legend_h
    plot_w, plot_h = width - left - right, height - top - bottom - legend_h
    xs_all = [x for _, xs, _ in series for x in xs] or [0.0, 1.0]
    ys_all = [y for _, _, ys in series for y in ys if y is not None and math.isfinite(y)]
    x0, x1 = min(xs_all), max(xs_all)
    if x1 - x0 < 1e-12:
        x1 = x0 + 1.0
    y0, y1 = _range(ys_all, y_range)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = _svg_frame(width, height, title, left, plot_w, py, _ticks(y0, y1))
    for t in _ticks(x0, x1):
        parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="#444"/>')
        parts.append(f'<text x="{px(t):.1f}" y="{top + plot_h + 17}" text-anchor="middle" font-size="11">{_esc(f"{t:.4g}")}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 34}" text-anchor="middle" font-size="12">{_esc(x_label)}</text>')
    parts.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" font-size="12" transform="rotate(-90 14 {top + plot_h / 2:.1f})">{_esc(y_label)}</text>'
    )
    if marker_x is not None and x0 <= marker_x <= x1:
        parts.append(f'<line x1="{px(marker_x):.1f}" x2="{px(marker_x):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#999" stroke-dasharray="4 3"/>')
    for i, (label, xs, ys) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        segment: list[str] = []
        for x, y in list(zip(xs, ys)) + [(None, None)]:
            if y is None or x is None or not math.isfinite(y):
                if len(segment) == 1:
                    parts.append(f'<circle cx="{segment[0].split(",")[0]}" cy="{segment[0].split(",")[1]}" r="2.5" fill="{color}"/>')
                elif segment:
                    parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(segment)}"/>')
                segment = []
            else:
                segment.append(f"{px(x):.1f},{py(y):.1f}")
        ly = top + plot_h + bottom + 16 * i
        parts.append(f'<rect x="{left}" y="{ly - 9}" width="14" height="4" fill="{color}"/>')
        parts.append(f'<text x="{left + 20}" y="{ly - 4}" font-size="11">{_esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bar_chart(labels: Sequence[str], values: Sequence[Optional[float]], title: str, height: int = 260) -> str:
    """An SVG bar chart of one value per label (missing values are labelled n/a)."""
    left, right, top, bottom = 56, 12, 30, 74
    width = max(300, left + right + 56 * len(labels))
    plot_w, plot_h = width - left - right, height - top - bottom
    present = [v for v in values if v is not None and math.isfinite(v)]
    lo, hi = min(present + [0.0]), max(present + [0.0])
    if hi - lo < 1e-12:
        hi = lo + 1.0
    hi += (hi - lo) * 0.1

    def py(y: float) -> float:
        return top + (1 - (y - lo) / (hi - lo)) * plot_h

    parts = _svg_frame(width, height, title, left, plot_w, py, _ticks(lo, hi))
    slot = plot_w / max(len(labels), 1)
    for i, (label, value) in enumerate(zip(labels, values)):
        cx = left + slot * (i + 0.5)
        bar_w = slot * 0.6
        if value is not None and math.isfinite(value):
            y_top, y_base = py(max(value, 0.0)), py(min(value, 0.0))
            parts.append(
                f'<rect x="{cx - bar_w / 2:.1f}" y="{y_top:.1f}" width="{bar_w:.1f}" height="{max(y_base - y_top, 0.5):.1f}" fill="{PALETTE[i % len(PALETTE)]}"/>'
            )
            label_y = y_top - 4 if value >= 0 else y_base + 12
            parts.append(f'<text x="{cx:.1f}" y="{label_y:.1f}" text-anchor="middle" font-size="11">{_esc(f"{value:.4g}")}</text>')
        else:
            parts.append(f'<text x="{cx:.1f}" y="{py(0) - 4:.1f}" text-anchor="middle" font-size="11" fill="#888">n/a</text>')
        short = label if len(label) <= 20 else label[:19] + "…"
        ly = top + plot_h + 14
        parts.append(f'<text x="{cx:.1f}" y="{ly}" text-anchor="end" font-size="11" transform="rotate(-30 {cx:.1f} {ly})">{_esc(short)}</text>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(0):.1f}" y2="{py(0):.1f}" stroke="#444"/>')
    parts.append("</svg>")
    return "".join(parts)


class _Images:
    """Turns image paths into <img> sources: base64 data URIs, or files copied next to the report."""

    def __init__(self, report_path: Path, embed: bool, thumbnail: int):
        self.embed = embed
        self.thumbnail = thumbnail
        self.folder = report_path.parent / f"{report_path.stem}_files"
        self.prefix = f"{report_path.stem}_files"
        self.count = 0

    def src(self, path: Optional[str], name: str) -> Optional[str]:
        if not path or not Path(path).is_file():
            return None
        with Image.open(path) as im:
            im = im.convert("RGB") if im.mode not in ("RGB", "L") else im.copy()
        im.thumbnail((self.thumbnail, self.thumbnail), Image.Resampling.LANCZOS)
        # photos as JPEG (a tenth of the size: reports of thousands of jobs stay openable), masks as PNG
        kind = "png" if im.mode == "L" else "jpeg"
        buffer = io.BytesIO()
        im.save(buffer, format=kind.upper(), **({"quality": 90} if kind == "jpeg" else {}))
        if self.embed:
            return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        self.count += 1
        filename = f"{self.count:05d}_{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:80]}.{'png' if kind == 'png' else 'jpg'}"
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / filename).write_bytes(buffer.getvalue())
        return f"{self.prefix}/{filename}"


def _series(results: dict) -> list[tuple[str, dict]]:
    """(label, part) for each run, plus each method of runs that mix methods."""
    out = []
    for run in results["runs"]:
        out.append((run["label"], run))
        for method, part in (run.get("by_method") or {}).items():
            out.append((f"{run['label']} / {method}", part))
    return out


def _metric_table(results: dict) -> str:
    series = _series(results)
    names = [n for n in METRICS if any(part["aggregate"].get(n, {}).get("mean") is not None for _, part in series)]
    head = "".join(f'<th title="{_esc(METRICS[n].definition)}">{_esc(METRICS[n].label)} {"↑" if METRICS[n].higher_is_better else "↓"}</th>' for n in names)
    head += "".join(f'<th title="{_esc(a.definition)}">{_esc(a.label)} {"↑" if a.higher_is_better else "↓"}</th>' for a in AREAS.values())
    rows = []
    for label, part in series:
        cells = []
        for n in names:
            entry = part["aggregate"].get(n, {})
            mean = entry.get("mean")
            cells.append(f"<td>{_fmt(mean)}<br><span class='muted small'>±{_fmt(entry.get('std'), 3)} n={entry.get('count', 0)}</span></td>" if mean is not None else "<td class='muted'>—</td>")
        for a in AREAS:
            entry = part["areas"].get(a, {})
            note = entry.get("reason") or entry.get("warning") or ""
            cls = "muted" if entry.get("value") is None else ("warn" if entry.get("warning") else "")
            cells.append(f"<td class='{cls}' title='{_esc(note)}'>{_fmt(entry.get('value'))}{' *' if entry.get('warning') else ''}</td>")
        jobs = part.get("num_jobs", "")
        rows.append(f"<tr><td class='l'>{_esc(label)}<br><span class='muted small'>{jobs} jobs</span></td>{''.join(cells)}</tr>")
    return f"<table><tr><th class='l'>run</th>{head}</tr>{''.join(rows)}</table>"


def _toy_table(results: dict) -> str:
    """The toy detector's metrics per run (`metrics.toy_edit`), when any run has toy-world edits."""
    runs = [r for r in results["runs"] if "toy" in r]
    if not runs:
        return ""
    head = "".join(f"<th>{_esc(label)}</th>" for label in TOY_METRICS.values())
    rows = "".join(
        f"<tr><td class='l'>{_esc(r['label'])}<br><span class='muted small'>n={r['toy']['n']}</span></td>"
        + "".join(f"<td>{_fmt(r['toy'].get(key), 3)}</td>" for key in TOY_METRICS) + "</tr>"
        for r in runs
    )
    missing = [(r["label"], i, j["toy"]["unavailable"]) for r in results["runs"] for i, j in r["jobs"].items() if "unavailable" in j.get("toy", {})]
    notes = "".join(f"<li>{_esc(label)} / {_esc(i)}: {_esc(why)}</li>" for label, i, why in missing)
    return (
        "<h2>Toy-world detector</h2><p class='small muted'>metrics/toy_edit.py: success = the detector reads the target scene "
        "(background, object count, every object at its place with its target color and shape, or the subject); targets hit = "
        "fraction of edited objects holding their target; others / background kept; change outside = mean absolute change (8-bit RGB) "
        "outside the edited objects (+2 px); box IoU of the edited objects; subject score at the places that should become the subject.</p>"
        f"<table><tr><th class='l'>run</th>{head}</tr>{rows}</table>" + (f"<p class='small'>Not scored:</p><ul class='small'>{notes}</ul>" if notes else "")
    )


def _unavailable(results: dict) -> str:
    seen: dict[str, str] = {}
    for run in results["runs"]:
        seen.update(run.get("unavailable", {}))
    if not seen:
        return ""
    items = "".join(f"<li><b>{_esc(METRICS[k].label if k in METRICS else k)}</b>: {_esc(v)}</li>" for k, v in seen.items())
    return f"<h2>Metrics not computed</h2><ul>{items}</ul>"


def _area_notes(results: dict) -> str:
    notes = []
    for label, part in _series(results):
        for a, entry in part["areas"].items():
            note = entry.get("reason") or entry.get("warning")
            if note:
                notes.append(f"<li>{_esc(label)} — {_esc(note)}</li>")
    return f"<ul class='small'>{''.join(notes)}</ul>" if notes else ""


def _plots(results: dict) -> str:
    series = [(label, part) for label, part in _series(results) if part.get("curves", {}).get("success_rate")]
    settings = results.get("settings", {})
    charts = []
    if series:
        charts.append(
            svg_line_chart(
                [(label, part["curves"]["thresholds"], part["curves"]["success_rate"]) for label, part in series],
                "Editing success rate (CLIP-R > k)",
                "CLIP-R threshold k",
                "ratio of edits",
                y_range=(0.0, 1.0),
            )
        )
        for key, name in (("mean_l1", "L1"), ("mean_clip_i", "CLIP-I")):
            charts.append(
                svg_line_chart(
                    [(label, part["curves"]["thresholds"], part["curves"][key]) for label, part in series],
                    f"Mean {name} of edits with CLIP-R > k",
                    "CLIP-R threshold k",
                    f"mean {name}",
                    marker_x=settings.get("background_max"),
                )
            )
    all_series = _series(results)
    if len(all_series) > 1:
        labels = [label for label, _ in all_series]
        for name, info in METRICS.items():
            values = [part["aggregate"].get(name, {}).get("mean") for _, part in all_series]
            if any(v is not None for v in values):
                charts.append(svg_bar_chart(labels, values, f"{info.label} {'↑' if info.higher_is_better else '↓'}"))
        for name, info in AREAS.items():
            values = [part["areas"].get(name, {}).get("value") for _, part in all_series]
            if any(v is not None for v in values):
                charts.append(svg_bar_chart(labels, values, f"{info.label} {'↑' if info.higher_is_better else '↓'}"))
    if not charts:
        return "<p class='muted'>No plots: CLIP-R is not available and there is a single run.</p>"
    return "<div class='plots'>" + "".join(f"<div>{c}</div>" for c in charts) + "</div>"


def _comparison(results: dict) -> str:
    out = []
    for comp in results.get("comparison", []):
        rows = []
        for name, entry in comp["metrics"].items():
            info = METRICS[name]
            good = entry["mean_delta"] > 0 if info.higher_is_better else entry["mean_delta"] < 0
            rows.append(
                f"<tr><td class='l'>{_esc(info.label)} {'↑' if info.higher_is_better else '↓'}</td><td>{_fmt(entry['baseline_mean'])}</td>"
                f"<td>{_fmt(entry['other_mean'])}</td><td style='color:{'#2a7d2a' if good else '#b03030'}'>{entry['mean_delta']:+.4f}</td>"
                f"<td>{entry['improved']} / {entry['count']}</td></tr>"
            )
        extra = ""
        if comp["only_baseline"] or comp["only_other"]:
            extra = f"<p class='small muted'>unmatched jobs: {len(comp['only_baseline'])} only in {_esc(comp['baseline'])}, {len(comp['only_other'])} only in {_esc(comp['other'])}</p>"
        out.append(
            f"<h3>{_esc(comp['other'])} vs {_esc(comp['baseline'])} ({len(comp['common_jobs'])} jobs matched by id)</h3>"
            f"<table><tr><th class='l'>metric</th><th>{_esc(comp['baseline'])}</th><th>{_esc(comp['other'])}</th><th>mean Δ</th><th>jobs improved</th></tr>{''.join(rows)}</table>{extra}"
        )
    return "<h2>Paired comparison</h2>" + "".join(out) if out else ""


def _figure(src: Optional[str], caption: str, alt: str) -> str:
    """A figure; `caption` is HTML (already escaped), `alt` plain text."""
    if src is None:
        return f"<figure><div class='muted' style='width:128px;height:128px;border:1px dashed #ccc'>missing</div><figcaption>{caption}</figcaption></figure>"
    return f"<figure><img src='{_esc(src)}' alt='{_esc(alt)}'><figcaption>{caption}</figcaption></figure>"


def _gallery(results: dict, images: _Images, max_jobs: Optional[int]) -> str:
    runs = results["runs"]
    ids = list(dict.fromkeys(i for run in runs for i in list(run["jobs"]) + list(run["failures"])))
    shown = ids if max_jobs is None else ids[:max_jobs]
    blocks = []
    for job_id in shown:
        first = next((run["jobs"][job_id] for run in runs if job_id in run["jobs"]), None)
        figures = []
        header = f"<b>{_esc(job_id)}</b>"
        if first is not None:
            header += (
                f"<p class='prompt'><span class='muted'>source:</span> {_esc(first['source_prompt'])}</p>"
                f"<p class='prompt'><span class='muted'>target:</span> {_esc(first['target_prompt'])}</p>"
            )
            figures.append(_figure(images.src(first["source"], f"{job_id}_source"), "source", f"{job_id} source"))
            if first.get("ground_truth"):
                figures.append(_figure(images.src(first["ground_truth"], f"{job_id}_gt"), "ground truth", f"{job_id} ground truth"))
            mask = next((run["jobs"][job_id]["mask"] for run in runs if job_id in run["jobs"] and run["jobs"][job_id].get("mask")), None)
            if mask:
                figures.append(_figure(images.src(mask, f"{job_id}_mask"), "mask", f"{job_id} mask"))
        for run in runs:
            job = run["jobs"].get(job_id)
            if job is None:
                error = run["failures"].get(job_id)
                text = f"failed: {_esc(error)}" if error is not None else "not in this run"
                figures.append(f"<figure><div class='muted small' style='width:128px'>{_esc(run['label'])}: {text}</div></figure>")
                continue
            values = " · ".join(f"{_esc(METRICS[n].label)} {_fmt(job['metrics'][n], 3)}" for n in CARD_METRICS if n in job["metrics"])
            caption = f"<b>{_esc(run['label'])}</b> <span class='muted'>({_esc(job['method'])})</span><br><span class='small'>{values}</span>"
            figures.append(_figure(images.src(job["edited"], f"{run['label']}_{job_id}"), caption, f"{job_id} edited ({run['label']})"))
        blocks.append(f"<div class='job'>{header}<div class='imgs'>{''.join(figures)}</div></div>")
    more = f"<p class='muted'>{len(ids) - len(shown)} more jobs not shown (report_max_jobs).</p>" if len(shown) < len(ids) else ""
    return "<h2>Jobs</h2>" + "".join(blocks) + more


def _job_tables(results: dict) -> str:
    out = []
    for run in results["runs"]:
        names = [n for n in METRICS if any(n in j["metrics"] for j in run["jobs"].values())]
        head = "".join(f"<th>{_esc(METRICS[n].label)}</th>" for n in names)
        rows = "".join(
            f"<tr><td class='l'>{_esc(i)}</td><td class='l'>{_esc(j['method'])}</td>" + "".join(f"<td>{_fmt(j['metrics'].get(n))}</td>" for n in names) + "</tr>"
            for i, j in run["jobs"].items()
        )
        failures = "".join(f"<li>{_esc(i)}: {_esc(e)}</li>" for i, e in run["failures"].items())
        failed = f"<p>Failed jobs:</p><ul class='small'>{failures}</ul>" if failures else ""
        out.append(
            f"<details><summary>{_esc(run['label'])}: every job ({run['num_jobs']} finished, {run['num_failed']} failed)</summary>"
            f"<table><tr><th class='l'>job</th><th class='l'>method</th>{head}</tr>{rows}</table>{failed}</details>"
        )
    return "<h2>Per-job values</h2>" + "".join(out)


def render_report(results: dict, report_path: Path, embed_images: bool = True, thumbnail: int = 256, max_jobs: Optional[int] = None) -> str:
    """The report's HTML text (copied images, when not embedded, are written next to `report_path`)."""
    images = _Images(report_path, embed_images, thumbnail)
    runs = "".join(
        f"<tr><td class='l'>{_esc(r['label'])}</td><td class='l'>{_esc(r['dir'])}</td><td>{r['num_jobs']}</td><td>{r['num_failed']}</td><td class='l'>{_esc(', '.join(r['methods']))}</td></tr>"
        for r in results["runs"]
    )
    models = "".join(
        f"<tr><td class='l'>{_esc(k)}</td><td class='l'>{_esc(v.get('source') or '—')}</td><td class='l'>{_esc(v.get('status'))}</td></tr>"
        for k, v in results.get("models", {}).items()
    )
    settings = results.get("settings", {})
    grid = f"k = 1.00 … {settings.get('clip_r_max', 1.4):.2f} step {settings.get('clip_r_step', 0.01):g}; L1*/CLIP-I* up to k = {settings.get('background_max', 1.22):.2f}"
    body = (
        f"<h1>Edit evaluation</h1><p class='muted'>{_esc(results.get('created', ''))}</p>"
        f"<table><tr><th class='l'>run</th><th class='l'>folder</th><th>jobs</th><th>failed</th><th class='l'>methods</th></tr>{runs}</table>"
        f"<table><tr><th class='l'>model</th><th class='l'>source</th><th class='l'>status</th></tr>{models}</table>"
        f"<h2>Summary</h2><p class='small muted'>mean ± std over jobs; areas (LUSD) by Simpson's rule on {_esc(grid)}. Hover a header for its definition.</p>"
        f"{_metric_table(results)}{_area_notes(results)}{_toy_table(results)}{_unavailable(results)}"
        f"<h2>Plots</h2>{_plots(results)}{_comparison(results)}{_gallery(results, images, max_jobs)}{_job_tables(results)}"
    )
    return f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Edit evaluation</title><style>{CSS}</style></head><body>{body}</body></html>"


def write_report(results: dict, report_path: str | os.PathLike, embed_images: bool = True, thumbnail: int = 256, max_jobs: Optional[int] = None) -> Path:
    """Render and write the report atomically; returns its path."""
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    text = render_report(results, report_path, embed_images, thumbnail, max_jobs)
    write_text_atomic(text, report_path)
    return report_path
