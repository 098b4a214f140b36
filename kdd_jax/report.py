"""The human-readable end of the pipeline: a self-contained `report.html` (inline SVG plots and a
PNG probe grid as data URIs; no scripts, no network, no plotting dependency).

    html = render_detect_report(report_dict, result)
    write_report(out_dir / "report.html", html)

Plots: every candidate's score distribution (per-probe scores for point-wise scores, bootstrap
replicates of the set score otherwise), the bootstrap distribution of the winner's margin over
the runner-up, the calibration null per teacher with the student's score (when calibrated), and a
grid of the probe images. `svg_lines` draws the benchmarks' accuracy-vs-N curves.
"""

from __future__ import annotations

import base64
import html
import json
import struct
import zlib
from pathlib import Path

import numpy as np

from kdd_jax.io import atomic_write_bytes

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")
_FONT = 'font-family="sans-serif" font-size="11"'


# ------------------------------------------------------------------------------------------ PNG


def png_bytes(img: np.ndarray) -> bytes:
    """Encode uint8 [H, W] (grey) or [H, W, 3] (RGB) as PNG (stdlib zlib only)."""
    img = np.ascontiguousarray(img, np.uint8)
    if img.ndim == 2:
        color = 0
    elif img.ndim == 3 and img.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"png_bytes wants [H, W] or [H, W, 3] uint8, got shape {img.shape}")
    h, w = img.shape[:2]
    rows = img.reshape(h, -1)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def probe_grid(raw_nchw: np.ndarray, value_range: tuple[float, float], *, max_images: int = 64, cols: int = 16,
               scale: int = 2, pad: int = 2) -> np.ndarray:
    """Tile probes (NCHW floats in value_range) into one uint8 image (grey for 1 channel, else RGB
    from the first three channels), each scaled up `scale` times with nearest neighbours."""
    x = np.asarray(raw_nchw[:max_images], np.float32)
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"probe_grid wants a non-empty NCHW batch, got shape {x.shape}")
    lo, hi = value_range
    x = np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1)
    x = x[:, :1] if x.shape[1] < 3 else x[:, :3]
    x = (x.transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)
    x = x.repeat(scale, 1).repeat(scale, 2)
    n, h, w, c = x.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    return grid[..., 0] if c == 1 else grid


def data_uri_png(img: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode("ascii")


# ------------------------------------------------------------------------------------------ SVG


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _axis_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not np.isfinite([lo, hi]).all() or hi <= lo:
        return [lo]
    return list(np.linspace(lo, hi, n))


def svg_histogram_rows(rows: list[tuple[str, np.ndarray]], *, x_label: str, markers: dict[str, float] | None = None,
                       vline: float | None = None, bins: int = 30, width: int = 640) -> str:
    """One histogram per row on a shared x axis (small multiples). `markers[label]` draws a
    vertical line in that row (e.g. the audited student's score); `vline` one across all rows."""
    rows = [(lab, np.asarray(v, np.float64)[np.isfinite(v)]) for lab, v in rows]
    vals = [v for _, v in rows if len(v)]
    extra = [m for m in (markers or {}).values() if m is not None and np.isfinite(m)]
    if vline is not None:
        extra.append(vline)
    allv = np.concatenate(vals + [np.asarray(extra, np.float64)]) if vals or extra else np.zeros(1)
    lo, hi = float(allv.min()), float(allv.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.03 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    left, right, row_h, top = 150, 20, 46, 10
    plot_w = width - left - right
    height = top + row_h * len(rows) + 36
    xs = lambda v: left + (v - lo) / (hi - lo) * plot_w  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {_FONT}>']
    edges = np.linspace(lo, hi, bins + 1)
    for r, (label, v) in enumerate(rows):
        y0 = top + r * row_h
        color = _PALETTE[r % len(_PALETTE)]
        out.append(f'<text x="{left - 6}" y="{y0 + row_h / 2 + 4}" text-anchor="end">{html.escape(label[:22])}</text>')
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y0 + row_h - 4}" y2="{y0 + row_h - 4}" stroke="#ccc"/>')
        if len(v):
            counts, _ = np.histogram(v, edges)
            peak = max(counts.max(), 1)
            for i, c in enumerate(counts):
                if c:
                    bh = (row_h - 8) * c / peak
                    out.append(f'<rect x="{xs(edges[i]):.1f}" y="{y0 + row_h - 4 - bh:.1f}" '
                               f'width="{max(xs(edges[i + 1]) - xs(edges[i]) - 0.5, 0.5):.1f}" height="{bh:.1f}" '
                               f'fill="{color}" fill-opacity="0.75"/>')
        m = (markers or {}).get(label)
        if m is not None and np.isfinite(m):
            out.append(f'<line x1="{xs(m):.1f}" x2="{xs(m):.1f}" y1="{y0 + 2}" y2="{y0 + row_h - 2}" '
                       f'stroke="black" stroke-width="2"><title>{_fmt(m)}</title></line>')
    base = top + row_h * len(rows)
    if vline is not None:
        out.append(f'<line x1="{xs(vline):.1f}" x2="{xs(vline):.1f}" y1="{top}" y2="{base}" stroke="black" '
                   'stroke-dasharray="4 3"/>')
    for t in _axis_ticks(lo, hi):
        out.append(f'<line x1="{xs(t):.1f}" x2="{xs(t):.1f}" y1="{base}" y2="{base + 4}" stroke="#444"/>'
                   f'<text x="{xs(t):.1f}" y="{base + 15}" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{base + 30}" text-anchor="middle">{html.escape(x_label)}</text></svg>')
    return "".join(out)


def svg_lines(series: dict[str, tuple[list[float], list[float], list[float] | None]], *, x_label: str,
              y_label: str, log_x: bool = False, y_range: tuple[float, float] | None = None,
              width: int = 560, height: int = 320) -> str:
    """Line chart: series name -> (x values, y values, optional +-error). Used by the benchmarks."""
    pts = [(x, y) for xs_, ys_, _ in series.values() for x, y in zip(xs_, ys_)]
    if not pts:
        raise ValueError("svg_lines needs at least one point")
    tx = (lambda v: np.log10(v)) if log_x else (lambda v: v)
    xs_all = [tx(x) for x, _ in pts]
    x0, x1 = min(xs_all), max(xs_all)
    if x1 <= x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = y_range if y_range else (min(y for _, y in pts), max(y for _, y in pts))
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    left, right, top, bottom = 50, 150, 10, 40
    pw, ph = width - left - right, height - top - bottom
    X = lambda v: left + (tx(v) - x0) / (x1 - x0) * pw  # noqa: E731
    Y = lambda v: top + ph - (v - y0) / (y1 - y0) * ph  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {_FONT}>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for t in _axis_ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{Y(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for x in sorted({x for x, _ in pts}):
        out.append(f'<text x="{X(x):.1f}" y="{top + ph + 15}" text-anchor="middle">{_fmt(x)}</text>')
    for i, (name, (xv, yv, err)) in enumerate(series.items()):
        color = _PALETTE[i % len(_PALETTE)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{X(x):.1f},{Y(y):.1f}" for j, (x, y) in enumerate(zip(xv, yv)))
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for j, (x, y) in enumerate(zip(xv, yv)):
            out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{color}"/>')
            if err is not None:
                out.append(f'<line x1="{X(x):.1f}" x2="{X(x):.1f}" y1="{Y(y - err[j]):.1f}" y2="{Y(y + err[j]):.1f}" '
                           f'stroke="{color}"/>')
        ly = top + 14 * i + 8
        out.append(f'<rect x="{left + pw + 10}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{left + pw + 24}" y="{ly + 1}">{html.escape(name[:22])}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{html.escape(x_label)}</text>'
               f'<text x="12" y="{top + ph / 2}" transform="rotate(-90 12 {top + ph / 2})" text-anchor="middle">'
               f'{html.escape(y_label)}</text></svg>')
    return "".join(out)


# ------------------------------------------------------------------------------------------ page

_CSS = """body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.win{font-weight:bold;background:#eef6ee}
.answer{font-size:1.4em;padding:.6em;border:2px solid #444;display:inline-block}
.small{color:#666;font-size:.9em}pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:.85em}"""


def _none_paragraph(none, v) -> str:
    """The none-of-the-candidates test in words, or how to get one."""
    if none is None:
        return ("<p class='small'>Not calibrated: the verdict names the best candidate but cannot say "
                "&ldquo;none of the candidates&rdquo;. Pass <code>--calibration</code> (see <code>kdd calibrate</code>).</p>")
    loo = (f"; leave-one-out rate on the references {none.leave_one_out_fpr:.2f}"
           if none.leave_one_out_fpr is not None else "")
    few = (f". <b>Too few references</b>: at least {none.min_references} are needed to ever reject at this level."
           if none.n_references < none.min_references else ".")
    return (f"<p>None-of-the-candidates test against {none.n_references} independent reference students: "
            f"p = {none.p_none:.3g} (Bonferroni over {len(v.teachers)} candidates), level {none.alpha}; "
            f"false-positive rate on independent students &le; {none.alpha} when they are exchangeable with "
            f"the references{loo}{few}</p>")


def _teacher_table(v, stats: dict, none=None) -> str:
    """The verdict's teachers, best score first: score, interval, [p independent], queries, cache hits."""
    esc = html.escape
    head = "<tr><th>teacher</th><th>score</th><th>interval</th>" + ("<th>p (independent)</th>" if none else "") + \
           "<th>queries sent</th><th>cache hits</th></tr>"
    rows = []
    for i in np.argsort(-np.asarray(v.scores), kind="stable"):
        t = v.teachers[i]
        st = stats.get(t, {})
        lo, hi = v.intervals[i]
        rows.append(f"<tr class='{'win' if t == v.winner else ''}'><td>{esc(t)}</td><td>{_fmt(v.scores[i])}</td>"
                    f"<td>[{_fmt(lo)}, {_fmt(hi)}]</td>" + (f"<td>{none.p_per_teacher[t]:.3g}</td>" if none else "")
                    + f"<td>{st.get('queries', '-')}</td><td>{st.get('hits', '-')}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def render_detect_report(report: dict, result, *, calibration=None) -> str:
    """HTML for one `kdd detect` run. `report` is the verdict.json dict; `result` the DetectionResult
    (for the arrays the JSON summarises); `calibration` the Calibration used, if any."""
    v = result.verdict
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>kdd-jax report: {esc(str(report.get('student', '')))}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Distillation detection report</h1><p class='small'>student <code>{esc(str(report.get('student')))}</code>"
             f" &middot; teachers <code>{esc(str(report.get('teachers_file') or ', '.join(v.teachers)))}</code>"  # audits: no file
             f" &middot; kdd-jax "
             f"{esc(str(report.get('versions', {}).get('kdd_jax', '')))} &middot; {esc(str(report.get('date', '')))}</p>",
             f"<p class='answer'>Answer: <b>{esc(result.answer)}</b></p>"]
    none = result.none
    if v.runner_up is not None:
        parts.append(f"<p>Highest score: <b>{esc(v.winner)}</b>, ahead of {esc(v.runner_up)} by {_fmt(v.margin)} "
                     f"({result.config.score}); bootstrap p-value that the winner does not truly beat the runner-up: "
                     f"<b>{v.p_value:.3g}</b> ({v.n_bootstrap} paired resamples of {v.n_probes} probes).</p>")
    parts.append(_none_paragraph(none, v))
    parts.append(_teacher_table(v, result.teacher_stats, none))
    # score distributions
    if result.per_probe is not None:
        dist = [(t, result.per_probe[k]) for k, t in enumerate(v.teachers)]
        what = f"per-probe {result.config.score} (the verdict averages these)"
    else:
        dist = [(t, v.bootstrap[:, k]) for k, t in enumerate(v.teachers)] if v.bootstrap is not None else []
        what = f"{result.config.score} on bootstrap resamples of the probes"
    if dist:
        parts.append(f"<h2>Score distributions</h2><p class='small'>{esc(what)}; the black line is each teacher's "
                     "score.</p>" + svg_histogram_rows(dist, x_label=result.config.score,
                                                        markers=dict(zip(v.teachers, v.scores))))
    if v.runner_up is not None and v.bootstrap is not None:
        w, r = v.teachers.index(v.winner), v.teachers.index(v.runner_up)
        parts.append(f"<h2>Margin</h2><p class='small'>{esc(v.winner)} minus {esc(v.runner_up)} over {v.n_bootstrap} "
                     "bootstrap resamples; mass left of the dashed line is the p-value.</p>"
                     + svg_histogram_rows([("margin", v.bootstrap[:, w] - v.bootstrap[:, r])], x_label="score margin",
                                          vline=0.0))
    if calibration is not None:
        null = calibration.null(v.teachers)
        parts.append("<h2>Calibration</h2><p class='small'>Scores of independent reference students against each "
                     "teacher; the black line is the audited student.</p>"
                     + svg_histogram_rows([(t, null[:, k]) for k, t in enumerate(v.teachers)],
                                          x_label=result.config.score, markers=dict(zip(v.teachers, v.scores))))
    # probes
    pre = report.get("preprocessing") or {}
    vr = tuple(pre.get("value_range", (0.0, 1.0)))
    raw = result.probes.raw
    parts.append(f"<h2>Probes</h2><p class='small'>The first {min(64, len(raw))} of {len(raw)} probes "
                 f"({esc(result.config.synthesis.method)}, seed {result.config.synthesis.seed}); sha256 "
                 f"<code>{result.probes.sha256}</code></p><img alt='probe grid' src='{data_uri_png(probe_grid(raw, vr))}'/>")
    parts.append("<h2>Run record</h2><pre>" + esc(json.dumps(
        {k: report[k] for k in ("config", "seed", "timings_s", "versions", "probes") if k in report}, indent=2))
        + "</pre></body></html>")
    return "".join(parts)


def render_generative_report(report: dict, result) -> str:
    """HTML for one generative detection: the verdict table, per-probe score distributions, and the
    student's images next to every teacher's from the same x_T."""
    v = result.verdict
    esc = html.escape
    score = result.config.score
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>kdd-jax report: {esc(str(report.get('student', '')))}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Distillation detection report (generative)</h1><p class='small'>student "
             f"<code>{esc(str(report.get('student')))}</code> &middot; kdd-jax "
             f"{esc(str(report.get('versions', {}).get('kdd_jax', '')))} &middot; {esc(str(report.get('date', '')))}</p>",
             f"<p class='answer'>Answer: <b>{esc(result.answer)}</b></p>"]
    if v.runner_up is not None:
        parts.append(f"<p>Highest score: <b>{esc(v.winner)}</b>, ahead of {esc(v.runner_up)} by {_fmt(v.margin)} ({esc(score)}); "
                     f"bootstrap p-value that the winner does not truly beat the runner-up: <b>{v.p_value:.3g}</b> "
                     f"({v.n_bootstrap} paired resamples of {v.n_probes} probes).</p>")
    parts.append(_none_paragraph(result.none, v))
    parts.append(_teacher_table(v, result.teacher_stats, result.none))
    if result.per_probe is not None:
        parts.append(f"<h2>Score distributions</h2><p class='small'>per-probe {esc(score)}; the black line is each "
                     "teacher's mean.</p>" + svg_histogram_rows([(t, result.per_probe[k]) for k, t in enumerate(v.teachers)],
                                                               x_label=score, markers=dict(zip(v.teachers, v.scores))))
    n = min(16, len(result.student_images))
    prompts = ", ".join(repr(p) for p in result.request.prompts[:n])
    parts.append(f"<h2>Images from the same initial noise</h2><p class='small'>First {n} of {len(result.student_images)} "
                 f"probes ({esc(result.config.probes)} prompts: {esc(prompts)}; seeds in the run record). "
                 "Row 1: the student; then each teacher, best score first.</p>")
    order = [v.teachers[i] for i in np.argsort(-np.asarray(v.scores), kind="stable")]
    for who, images in [("student", result.student_images), *[(t, result.teacher_images[t]) for t in order]]:
        grid = probe_grid(np.transpose(images[:n], (0, 3, 1, 2)), (0.0, 1.0), max_images=n, cols=n)
        parts.append(f"<p class='small'>{esc(who)}</p><img alt='{esc(who)}' src='{data_uri_png(grid)}'/>")
    parts.append("<h2>Run record</h2><pre>" + esc(json.dumps(
        {k: report[k] for k in ("config", "seed", "probes", "timings_s", "versions", "sampling") if k in report}, indent=2))
        + "</pre></body></html>")
    return "".join(parts)


def _cell(v) -> str:
    """A table number; blank for a missing or NaN value."""
    return "" if v is None or v != v else f"{v:.4g}"


def _extra_cell(v) -> str:
    """A caller's extra column (e.g. kdd demo's true teacher): text, yes/no, a number or blank."""
    if isinstance(v, bool):
        return "yes" if v else "<b>no</b>"
    return _cell(v) if v is None or isinstance(v, (int, float)) else html.escape(str(v))


def render_audit_index(doc: dict) -> str:
    """index.html of a `kdd audit` or `kdd demo` (doc: its summary.json dict). Self-contained, no
    scripts, no network: the student x teacher score matrix with each row's winner marked and
    shaded by score, the answer (and the caller's extra columns), margin and p-values, links to
    each student's report, failures."""
    e = html.escape
    teachers = doc["teachers"]
    extra = doc.get("extra_columns", [])
    head = "".join(f"<th>{e(t)}</th>" for t in teachers)
    body = []
    for r in doc["students"]:
        vals = [r["scores"].get(t) for t in teachers]
        finite = [v for v in vals if v is not None]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        cells = []
        for t, v in zip(teachers, vals):
            shade = 0.0 if v is None or hi == lo else (v - lo) / (hi - lo)
            cls = " class='win'" if t == r["winner"] else ""
            cells.append(f"<td{cls} style='background:rgba(44,123,182,{0.1 + 0.5 * shade:.2f})'>{_cell(v)}</td>")
        link = f"students/{e(r['student'])}/report.html"
        more = "".join(f"<td>{_extra_cell(r.get(c))}</td>" for c in extra)
        body.append(f"<tr><td><a href='{link}'>{e(r['student'])}</a></td><td>{e(r['answer'])}</td>{more}{''.join(cells)}"
                    f"<td>{_cell(r['margin'])}</td><td>{_cell(r['p_value'])}</td><td>{_cell(r['p_none'])}</td></tr>")
    fails = "".join(f"<li><b>{e(n)}</b>: {e(m)}</li>" for n, m in sorted(doc["failed"].items()))
    counts = ", ".join(f"{e(k)}: {v}" for k, v in doc["answers"].items() if v)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>kdd-jax audit</title><style>{_CSS}</style>"
        "</head><body>"
        f"<h1>Distillation audit: {doc['counts']['finished']} of {doc['counts']['students']} students</h1>"
        f"<p>Answers: {counts or 'none yet'}. Score: {e(str(doc['settings'].get('score')))} (higher = closer); "
        f"the highlighted cell is each student's most likely teacher. Bootstrap p: the winner does not beat the runner-up; "
        f"p none: the student is independent of every candidate (only with a calibration).</p>"
        f"<table><tr><th>student</th><th>answer</th>{''.join(f'<th>{e(c)}</th>' for c in extra)}{head}"
        "<th>margin</th><th>bootstrap p</th><th>p none</th></tr>"
        f"{''.join(body)}</table>"
        + (f"<h2>Failed ({len(doc['failed'])})</h2><ul>{fails}</ul>" if fails else "")
        + f"<p>Settings: {e(json.dumps(doc['settings']))}<br>Versions: {e(json.dumps(doc['versions']))}<br>"
        f"Written {e(doc['date'])}.</p></body></html>"
    )


def write_report(path: str | Path, page: str) -> None:
    atomic_write_bytes(path, page.encode("utf-8"))
