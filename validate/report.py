"""Writing the drift report: ``drift.json``, a self-contained ``drift.html`` and the PNG plots.

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
state), saved as PNG files next to the report and embedded in the HTML as base64, so the HTML is
one file that can be mailed or attached to a CI run.

Plots: per-image vision ``1 - cosine`` (log scale, threshold line), histogram of per-token KL,
top-1 agreement by answer position, grounding IoU (engine vs reference model, both against the
true box), and the worst items with their images, the true box, the reference's and the engine's
boxes drawn, and both answers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from runtime.files import atomic_write_bytes

from .thresholds import bound_text

COLORS = {"PASS": "#1a7f37", "FAIL": "#cf222e", "INFO": "#57606a", "N/A": "#9a6700",
          "INCONCLUSIVE": "#9a6700"}
BOX_COLORS = {"truth": (255, 200, 0), "ref": (40, 180, 60), "eng": (230, 40, 40)}


def _clean(o: Any) -> Any:
    """JSON-safe copy: non-finite floats become the strings "nan" / "inf" / "-inf"."""
    if isinstance(o, float):
        if math.isnan(o):
            return "nan"
        if math.isinf(o):
            return "inf" if o > 0 else "-inf"
        return o
    if isinstance(o, (np.floating,)):
        return _clean(float(o))
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    return o


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _figure(w: float = 6.4, h: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _placeholder(title: str, text: str) -> bytes:
    fig = _figure(6.4, 2.0)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, color="#57606a",
            transform=ax.transAxes)
    return _png(fig)


def plot_vision(report) -> bytes:
    st = report.stages.get("vision")
    if st is None or not st.items:
        return _placeholder("vision: 1 - cosine per image", st.error if st and st.error else
                            "not run")
    names = [r["id"] for r in st.items]
    cos = np.array([r["cosine"] if isinstance(r["cosine"], float) else np.nan for r in st.items])
    err = 1.0 - cos
    floor = 1e-12
    vals = np.where(np.isnan(err), 1.0, np.maximum(err, floor))
    t = report.gates.get(("vision", "cosine_min"))
    fig = _figure(max(6.4, 0.35 * len(names) + 2), 3.8)
    ax = fig.add_subplot()
    colors = ["#cf222e" if (np.isnan(c) or (t and c < t.value)) else "#0969da" for c in cos]
    bottom = floor / 10
    ax.bar(range(len(names)), vals - bottom, bottom=bottom, color=colors)
    ax.set_yscale("log")
    ax.set_ylim(bottom, max(2.0, float(np.max(vals)) * 2))
    if t is not None and t.op != "info":
        ax.axhline(1 - t.value, color="#cf222e", ls="--", lw=1,
                   label=f"threshold: cosine >= {t.value:g}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"1 - cosine (log; floor {floor:g})")
    ax.set_title("vision: 1 - cosine(engine, torch fp32) per image (red: fail / NaN)",
                 fontsize=10)
    return _png(fig)


def plot_kl(report) -> bytes:
    st = report.stages.get("decoder")
    kls = np.array([k for r in (st.items if st else []) for k in r["kl"]
                    if isinstance(k, float)], dtype=np.float64)
    if st is None or kls.size == 0:
        return _placeholder("decoder: KL per token", st.error if st and st.error else "not run")
    finite = kls[np.isfinite(kls)]
    floor = 1e-15
    logs = np.log10(np.maximum(finite, floor))
    th = report.gates
    marks = [math.log10(t.value) for key in ("kl_mean", "kl_p95")
             if (t := th.get(("decoder", key))) is not None and t.op != "info"]
    lo = math.floor(min([*logs.tolist(), *marks, 0.0])) - 0.5
    hi = math.ceil(max([*logs.tolist(), *marks, -15.0])) + 0.5
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(logs, bins=np.linspace(lo, hi, 49), color="#0969da", label="tokens")
    for key, style in (("kl_mean", "--"), ("kl_p95", ":")):
        t = th.get(("decoder", key))
        if t is not None and t.op != "info":
            ax.axvline(math.log10(t.value), color="#cf222e", ls=style, lw=1,
                       label=f"{key} threshold {t.value:g}")
    if finite.size:
        ax.axvline(math.log10(max(float(np.mean(finite)), floor)), color="#1a7f37", lw=1.5,
                   ls="-.", label=f"mean {np.mean(finite):.3g}")
    ax.set_xlim(lo, hi)
    ax.legend(fontsize=8)
    ax.set_xlabel(f"log10 KL(ref || engine) per answer token (floor {floor:g})")
    ax.set_ylabel("tokens")
    bad = kls.size - finite.size
    extra = f", {bad} non-finite" if bad else ""
    ax.set_title(f"decoder: KL histogram ({kls.size} tokens{extra})")
    return _png(fig)


def plot_agreement(report) -> bytes:
    st = report.stages.get("decoder")
    if st is None or not st.items:
        return _placeholder("decoder: top-1 agreement by position",
                            st.error if st and st.error else "not run")
    L = max(len(r["top1"]) for r in st.items)
    sums, counts = np.zeros(L), np.zeros(L)
    for r in st.items:
        a = np.asarray(r["top1"], dtype=np.float64)
        sums[:len(a)] += a
        counts[:len(a)] += 1
    frac = sums / np.maximum(counts, 1)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(np.arange(L), frac, marker="o", ms=3, color="#0969da", label="top-1 agreement")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("answer token position")
    ax.set_ylabel("fraction of items")
    t = report.gates.get(("decoder", "top1"))
    if t is not None and t.op != "info":
        ax.axhline(t.value, color="#cf222e", ls="--", lw=1, label=f"threshold {t.value:g}")
    ax2 = ax.twinx()
    ax2.bar(np.arange(L), counts, color="#d0d7de", alpha=0.5, zorder=0)
    ax2.set_ylabel("items reaching this position", color="#57606a")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("decoder: top-1 agreement by answer position (teacher-forced)")
    return _png(fig)


def plot_iou(report) -> bytes:
    st = report.stages.get("task")
    if st is None or st.error:
        return _placeholder("task: grounding IoU", st.error if st and st.error else "not run")
    g = [r for r in st.items if r.get("task") == "grounding"]
    pts = [(r["iou_truth_ref"], r["iou_truth_eng"]) for r in g if "iou_truth_ref" in r]
    has_ref = any(r.get("ref_boxes") for r in g)
    if not g or not has_ref:
        m = st.metric("grounding_hit_ref")
        return _placeholder("task: grounding IoU, engine vs reference",
                            (m.note if m and m.note else "n/a (no grounding items)"))
    fig = _figure(4.8, 4.4)
    ax = fig.add_subplot()
    if pts:
        x, y = np.array(pts).T
        ax.scatter(x, y, s=30, color="#0969da", alpha=0.8)
        ax.set_xlabel("reference model: IoU with the true box")
        ax.set_ylabel("engine: IoU with the true box")
    else:
        ref_iou = [r.get("iou_ref", 0.0) for r in g if r.get("ref_boxes")]
        ax.scatter(range(len(ref_iou)), ref_iou, s=30, color="#0969da")
        ax.set_xlabel("item")
        ax.set_ylabel("engine IoU with the reference's box")
    ax.plot([0, 1], [0, 1], color="#57606a", lw=1, ls="--")
    ax.axhline(0.5, color="#d0d7de", lw=1)
    ax.axvline(0.5, color="#d0d7de", lw=1)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("task: grounding IoU, engine vs reference")
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# Worst items
# ---------------------------------------------------------------------------------------------

def _item_records(report) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, st in report.stages.items():
        for r in st.items:
            out.setdefault(r["id"], {})[name] = r
    return out


def worst_items(report, k: int = 8) -> list[str]:
    """Ids of the worst items: the lowest vision cosines, highest KLs and worst task results,
    interleaved stage by stage, without repeats."""
    lists: list[list[str]] = []
    v = report.stages.get("vision")
    if v and v.items:
        by_img = sorted(v.items, key=lambda r: (-1 if not isinstance(r["cosine"], float)
                                                or math.isnan(r["cosine"]) else r["cosine"]))
        lists.append([r["id"] for r in by_img])
    d = report.stages.get("decoder")
    if d and d.items:
        def kl(r):
            x = r["kl_mean"]
            return math.inf if not isinstance(x, float) or math.isnan(x) else x
        lists.append([r["id"] for r in sorted(d.items, key=kl, reverse=True)])
    t = report.stages.get("task")
    if t and t.items:
        def bad(r):
            s = 0.0 if r["agree"] else 1.0
            if "iou_ref" in r:
                s += 1.0 - r["iou_ref"]
            if "iou_truth_eng" in r:
                s += max(0.0, r.get("iou_truth_ref", 0.0) - r["iou_truth_eng"])
            if "cer_ref" in r:
                s += min(r["cer_ref"], 1.0)
            return s
        lists.append([r["id"] for r in sorted(t.items, key=bad, reverse=True) if bad(r) > 0])
    out: list[str] = []
    for rank in range(max((len(x) for x in lists), default=0)):
        for lst in lists:
            if rank < len(lst) and lst[rank] not in out:
                out.append(lst[rank])
            if len(out) >= k:
                return out
    return out


def draw_item(image, rec: dict[str, Any], max_side: int = 300) -> bytes:
    """Thumbnail JPEG with the true (yellow), reference (green) and engine (red) boxes."""
    from PIL import ImageDraw

    img = image.convert("RGB").copy()
    W, H = img.size
    s = min(1.0, max_side / max(W, H))
    img = img.resize((max(1, round(W * s)), max(1, round(H * s))))
    d = ImageDraw.Draw(img)
    task = rec.get("task", {})
    # truth widest (a yellow rim stays visible around a matching reference box), engine on top
    for key, color, width in (("truth_boxes", BOX_COLORS["truth"], 6),
                              ("ref_boxes", BOX_COLORS["ref"], 3),
                              ("eng_boxes", BOX_COLORS["eng"], 2)):
        for b in task.get(key, []) or []:
            x1, y1, x2, y2 = (float(v) * s for v in b)
            d.rectangle((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), outline=color,
                        width=width)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1f2328;
max-width:1200px} h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid
#d0d7de;padding-bottom:4px} table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa} .v{font-weight:600;color:#fff;border-radius:4px;padding:1px 6px}
.num{font-family:ui-monospace,monospace;text-align:right} .muted{color:#57606a;font-size:12px}
.plots img{max-width:100%;border:1px solid #d0d7de;margin:6px 0} .cards{display:flex;
flex-wrap:wrap;gap:12px} .card{border:1px solid #d0d7de;border-radius:6px;padding:8px;width:330px;
font-size:12px} .card pre{white-space:pre-wrap;word-break:break-all;background:#f6f8fa;
padding:4px;margin:2px 0;max-height:90px;overflow:auto} .legend span{display:inline-block;
width:12px;height:12px;margin:0 4px 0 10px;vertical-align:middle}
"""


def _badge(verdict: str) -> str:
    return f'<span class="v" style="background:{COLORS.get(verdict, "#57606a")}">{verdict}</span>'


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return f"{v:.6g}"
    return html.escape(str(v))


def _b64(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def render_html(report, plots: dict[str, bytes], cards: list[tuple[str, bytes | None]]) -> str:
    """The self-contained HTML report: header, one section per stage, the worst items, gates."""
    e = html.escape
    out = _html_header(report)
    _html_stages(report, plots, out)
    out.append("<h2>Worst items</h2><p class='legend muted'>boxes:<span style='background:"
               "rgb(255,200,0)'></span>ground truth<span style='background:rgb(40,180,60)'></span>"
               "reference model<span style='background:rgb(230,40,40)'></span>engine</p>"
               "<div class='cards'>")
    _html_cards(report, cards, out)
    out.append("</div>")
    out.append("<h2>Thresholds</h2><p class='muted'>validate/thresholds.py, plan "
               f"{e(report.plan)}, {e(report.target)} target: " + ", ".join(
                   e(f"{k[0]}.{k[1]} {t.op} {t.value:g}") for k, t in
                   report.gates.items() if t.op != "info") + "</p>")
    out.append("</body></html>")
    return "\n".join(out)


def _html_header(report) -> list[str]:
    """Title, run metadata and the table of stage verdicts."""
    e = html.escape
    meta = report.meta
    rows = []
    for name, st in report.stages.items():
        rows.append(f"<tr><td>{e(name)}</td><td>{_badge(st.verdict)}</td>"
                    f"<td class='num'>{st.seconds:.1f} s</td><td>{e(st.error or '')}</td></tr>")
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>drift report "
           f"{e(report.verdict)}</title><style>{_CSS}</style></head><body>",
           f"<h1>Drift report {_badge(report.verdict)} <span class='muted'>plan "
           f"{e(report.plan)}, {e(report.target)} target bounds</span></h1>",
           f"<p>{e(report.summary_line())}</p>",
           "<table><tr><th>bundle</th><td>" + e(str(meta.get("bundle"))) + "</td></tr>"
           "<tr><th>source checkpoint</th><td>" + e(json.dumps(meta.get("source"))) + "</td></tr>"
           "<tr><th>reference</th><td>" + e(str(meta.get("reference"))) +
           (" + fake-quant diagnostics" if meta.get("fake_quant_reference") else "") + "</td></tr>"
           f"<tr><th>validation items</th><td>{meta.get('n_items')} items, {meta.get('n_images')} "
           f"images; tasks {e(json.dumps(meta.get('tasks')))}</td></tr>"
           f"<tr><th>created</th><td>{e(str(meta.get('created')))} ({meta.get('seconds')} s, "
           f"{e(str(meta.get('providers')))})</td></tr></table>",
           "<h2>Stages</h2><table><tr><th>stage</th><th>verdict</th><th>time</th><th>error</th>"
           "</tr>" + "".join(rows) + "</table>"]
    return out


def _html_stages(report, plots: dict[str, bytes], out: list[str]) -> None:
    """Each stage's metric table and its plots."""
    e = html.escape
    for name, st in report.stages.items():
        out.append(f"<h2>{e(name)} {_badge(st.verdict)}</h2>")
        if st.error:
            out.append(f"<p style='color:#cf222e'>error: {e(st.error)}</p>")
        if st.metrics:
            out.append("<table><tr><th>metric</th><th>value</th><th>threshold</th><th>verdict</th>"
                       "<th>n</th><th>what</th><th>note</th></tr>")
            for m in st.metrics:
                thr = bound_text(m.op, m.threshold)
                out.append(f"<tr><td>{e(m.name)}</td><td class='num'>{_fmt(m.value)}</td>"
                           f"<td>{e(thr)}</td><td>{_badge(m.verdict)}</td><td class='num'>{m.n}"
                           f"</td><td class='muted'>{e(m.description)}</td><td>{e(m.note)}</td>"
                           "</tr>")
            out.append("</table>")
        for key in {"vision": ["vision_cosine"], "decoder": ["kl_hist", "agreement_by_position"],
                    "task": ["iou_scatter"]}.get(name, []):
            if key in plots:
                out.append(f"<div class='plots'><img alt='{key}' src='{_b64(plots[key])}'></div>")


def _html_cards(report, cards: list[tuple[str, bytes | None]], out: list[str]) -> None:
    """One card per worst item: its thumbnail, per-stage numbers, prompt and both answers."""
    e = html.escape
    recs = _item_records(report)
    items = {it.id: it for it in report.items}
    for item_id, thumb in cards:
        r = recs.get(item_id, {})
        it = items.get(item_id)
        lines = []
        if "vision" in r:
            lines.append(f"vision cosine {_fmt(r['vision']['cosine'])}, rel L2 "
                         f"{_fmt(r['vision']['rel_l2'])}")
        if "decoder" in r:
            dd = r["decoder"]
            fd = dd["first_divergence"]
            lines.append(f"KL mean {_fmt(dd['kl_mean'])}, top-1 {_fmt(dd['top1_mean'])}, greedy "
                         + ("identical" if fd is None else f"diverges at token {fd}"))
        t = r.get("task", {})
        if "iou_ref" in t:
            lines.append(f"IoU vs reference {_fmt(t['iou_ref'])}")
        if "iou_truth_eng" in t:
            lines.append(f"IoU vs truth: engine {_fmt(t['iou_truth_eng'])}, reference "
                         f"{_fmt(t['iou_truth_ref'])}")
        if "cer_ref" in t:
            lines.append(f"CER vs reference {_fmt(t['cer_ref'])}")
        prompt = "" if it is None else (it.prompt + (f" <ref>{it.ref}</ref>" if it.ref else ""))
        img_tag = (f"<img src='data:image/jpeg;base64,{base64.b64encode(thumb).decode()}' "
                   "style='max-width:100%'>" if thumb else "")
        out.append(
            f"<div class='card'><b>{e(item_id)}</b> <span class='muted'>"
            f"{e(it.task if it else '')} {e(it.describe_image() if it else '')}</span><br>"
            f"{img_tag}<div>{'<br>'.join(e(x) for x in lines)}</div>"
            f"<div class='muted'>prompt</div><pre>{e(prompt)}</pre>"
            + (f"<div class='muted'>reference answer</div><pre>{e(str(t.get('ref_text')))}</pre>"
               f"<div class='muted'>engine answer</div><pre>{e(str(t.get('eng_text')))}</pre>"
               if t else "") + "</div>")


def write_report(report, out_dir: str | Path, plots: bool = True, worst: int = 8) -> Path:
    """Write ``drift.json``, ``drift.html`` and the plot PNGs into ``out_dir``; returns the HTML."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _clean(report.to_dict())
    atomic_write_bytes(out / "drift.json",
                  (json.dumps(data, indent=1, allow_nan=False) + "\n").encode())
    figs: dict[str, bytes] = {}
    if plots:
        figs = {"vision_cosine": plot_vision(report), "kl_hist": plot_kl(report),
                "agreement_by_position": plot_agreement(report), "iou_scatter": plot_iou(report)}
        for name, png in figs.items():
            atomic_write_bytes(out / f"{name}.png", png)
    cards: list[tuple[str, bytes | None]] = []
    recs = _item_records(report)
    for item_id in worst_items(report, worst):
        img = report.images.get(item_id)
        cards.append((item_id, draw_item(img, recs.get(item_id, {})) if img is not None else None))
    page = render_html(report, figs, cards)
    atomic_write_bytes(out / "drift.html", page.encode("utf-8"))
    return out / "drift.html"
