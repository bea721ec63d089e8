"""report.html: one self-contained page (plots as inline PNGs, thumbnails as inline JPEGs, no URL) from report.json's data."""

from __future__ import annotations

import base64
import copy
import io
from html import escape

import numpy as np
from matplotlib.figure import Figure

THING, STUFF, DELTA = "#3b6fb6", "#c8883a", "#5a9e5a"
SET_COLOURS = {"pred": "#3b6fb6", "compare": "#c44e52"}

# Runs before anything else: records every script error and every resource (image) that fails to load.
_WATCH = """<script>
window.reportProblems = [];
window.addEventListener("error", function (event) {
  var target = event.target;
  window.reportProblems.push(target && target.tagName ? "failed to load: " + (target.alt || target.tagName)
                                                      : "script error: " + event.message);
}, true);
</script>"""

# Runs at load: every <img> decoded, every plot drawn with a size, no error recorded. The verdict goes to
# <html data-check> and the page's footer, where a headless browser's DOM dump (and a reader) sees it.
_CHECK = """<script>
window.addEventListener("load", function () {
  var problems = window.reportProblems.slice();
  Array.prototype.forEach.call(document.images, function (img) {
    if (!img.complete || img.naturalWidth === 0) problems.push("image did not load: " + img.alt);
  });
  Array.prototype.forEach.call(document.querySelectorAll("[data-plot]"), function (figure) {
    var img = figure.querySelector("img");
    var box = img ? img.getBoundingClientRect() : null;
    if (!img || img.naturalWidth === 0 || !box || box.width === 0 || box.height === 0)
      problems.push("plot did not render: " + figure.getAttribute("data-plot"));
  });
  document.documentElement.setAttribute("data-check", problems.length ? "failed" : "ok");
  document.getElementById("check").textContent = problems.length ? "problems: " + problems.join("; ")
                                                                 : "ok (" + document.images.length + " images)";
});
</script>"""

_STYLE = """<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 2px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } figure { margin: 0; } figcaption { font-size: 12px; color: #555; }
.thumbs { display: flex; flex-wrap: wrap; gap: 10px; } .thumbs figure { border: 1px solid #ddd; padding: 4px; }
.up { color: #1a7f37; } .down { color: #b3261e; } footer { margin-top: 32px; font-size: 12px; color: #777; }
</style>"""


def render(report: dict) -> str:
    """The whole page, from the report's data (the dict behind report.json, thumbnails' JPEGs included)."""
    inputs = report["inputs"]
    parts = [f"<h1>segpipe report: {escape(str(inputs['dataset']))}</h1>", _inputs(inputs)]
    if "contents" in report:
        parts.append(_contents(report["contents"]))
    if "comparison" in report:
        parts.append(_comparison(report["comparison"]))
    # health and errors: their sections' HTML goes here once pipeline/report/health.py and errors.py are merged.
    if report.get("thumbnails", {}).get("images"):
        parts.append(_thumbnails(report["thumbnails"]))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>segpipe report</title>\n"
            f"{_STYLE}\n{_WATCH}\n</head><body>\n{body}\n"
            f"<footer>Page check: <span id=\"check\">not run (scripts disabled?)</span></footer>\n{_CHECK}\n</body></html>\n")


def without_pixels(report: dict) -> dict:
    """report.json's content: the page's data without the thumbnails' JPEG bytes."""
    data = copy.deepcopy(report)
    for item in data.get("thumbnails", {}).get("images", []):
        item.pop("jpeg", None)
    return data


def _inputs(inputs: dict) -> str:
    rows = [("ground truth", f"{inputs['dataset']} ({inputs['kind']})"), ("predictions", inputs.get("pred")),
            ("compared with", inputs.get("compare")), ("images", inputs.get("images")), ("shards", inputs["shards"])]
    return _table(["input", ""], [(k, v) for k, v in rows if v is not None])


def _contents(c: dict) -> str:
    classes = c["classes"]
    summary = _table(["", ""], [
        ("images", f"{c['images']:,}"), ("segments", f"{c['segments']:,}"),
        ("classes (listed / present)", f"{classes['listed']} / {classes['present']}"),
        ("things (listed / present)", f"{classes['things']} / {classes['things_present']}"),
        ("stuff (listed / present)", f"{classes['stuff']} / {classes['stuff_present']}"),
        ("segments per image (mean / max)", f"{c['segments_per_image']['mean']:.2f} / {c['segments_per_image']['max']}"),
        ("crowd segments", f"{c['crowd']['segments']:,} ({_pct(c['crowd']['share_of_segments'])} of segments, "
                           f"{_pct(c['crowd']['share_of_labelled_pixels'])} of labelled pixels)"),
        ("VOID pixels", f"{c['void']['pixels']:,} ({_pct(c['void']['share_of_pixels'])} of pixels)"),
        ("COCO sizes of things (small / medium / large)",
         " / ".join(f"{c['instance_sizes']['coco'][k]:,}" for k in ("small", "medium", "large"))),
    ])
    plots = "".join([_class_plot(c["per_class"]), _size_plot(c["instance_sizes"]), _per_image_plot(c["segments_per_image"])])
    sizes = _table(["height", "width", "images"], [(s["height"], s["width"], f"{s['images']:,}") for s in c["image_sizes"][:10]])
    per_class = _table(["class", "kind", "segments", "images", "share of pixels"],
                       [(p["name"], "thing" if p["isthing"] else "stuff", f"{p['segments']:,}", f"{p['images']:,}",
                         _pct(p["share_of_pixels"])) for p in c["per_class"]])
    more = "" if len(c["image_sizes"]) <= 10 else f"<p>and {len(c['image_sizes']) - 10} more sizes</p>"
    return (f"<h2>Contents</h2>{summary}<div class=\"plots\">{plots}</div>"
            f"<h3>Image sizes</h3>{sizes}{more}<h3>Classes</h3>{per_class}")


def _comparison(c: dict) -> str:
    metric = c["metric"].upper()
    sets = c["sets"]
    head = ["class"] + [f"{metric} {name} [95% CI]" for name in sets] + (["delta (compare - pred) [95% CI]"] if len(sets) == 2 else [])
    rows = [[escape(r["name"])] + [_ci(r[name]) for name in sets] + ([_ci(r["delta"], signed=True)] if len(sets) == 2 else [])
            for r in [{"name": "all classes (mean)", **c["overall"]}, *c["per_class"]]]
    note = (f"<p>{metric} per class on all images; intervals: {escape(c['interval'])}, {c['resamples']:,} resamples, "
            f"seed {c['seed']}. A class that never occurs has no value.</p>")
    return f"<h2>Comparison</h2>{note}<div class=\"plots\">{_comparison_plot(c)}</div>{_table(head, rows, raw=True)}"


def _thumbnails(t: dict) -> str:
    items = []
    for item in t["images"]:
        caption = ", ".join(f"{p}: {n} segments" for p, n in zip(item["panels"], item["segments"]))
        alt = f"image {item['image_id']}"
        items.append(f"<figure><img alt=\"{escape(alt)}\" src=\"data:image/jpeg;base64,{item['jpeg']}\">"
                     f"<figcaption>{escape(str(item['file_name']))}<br>{escape(caption)}</figcaption></figure>")
    panels = " | ".join(t["images"][0]["panels"])
    return f"<h2>Images</h2><p>Left to right: {escape(panels)}; colour by class.</p><div class=\"thumbs\">{''.join(items)}</div>"


# --- plots: matplotlib figures as inline PNG ------------------------------------------------------


def _figure(name: str, caption: str, fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f"<figure data-plot=\"{escape(name)}\"><img alt=\"plot: {escape(name)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _class_plot(per_class: list[dict]) -> str:
    shown = [p for p in per_class if p["segments"]] or per_class
    fig = Figure(figsize=(5.2, max(2.0, 0.22 * len(shown) + 0.8)))
    ax = fig.subplots()
    y = np.arange(len(shown))
    ax.barh(y, [p["segments"] for p in shown], color=[THING if p["isthing"] else STUFF for p in shown])
    ax.set_yticks(y, [p["name"] for p in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("segments")
    ax.set_title("Segments per class (blue: things, orange: stuff)", fontsize=10)
    return _figure("classes", "class histogram", fig)


def _size_plot(sizes: dict) -> str:
    bins = sizes["bins"]
    last = max((k for k, b in enumerate(bins) if b["instances"]), default=0)
    bins = bins[:last + 1]
    fig = Figure(figsize=(5.2, 2.8))
    ax = fig.subplots()
    ax.bar(range(len(bins)), [b["instances"] for b in bins], color=THING)
    ax.set_xticks(range(0, len(bins), 2), [f"{b['min_area']:,}" for b in bins[::2]], rotation=60, fontsize=7)
    for edge, label in ((32**2, "small | medium"), (96**2, "medium | large")):
        position = np.log2(edge) + 0.5  # bin k starts at 2^(k-1)
        ax.axvline(position, color="#888", linestyle="--", linewidth=1)
        ax.text(position, ax.get_ylim()[1] * 0.95, label, fontsize=7, ha="center", va="top", rotation=90)
    ax.set_xlabel("instance area from (pixels, bins of x2)")
    ax.set_ylabel("instances")
    ax.set_title("Instance sizes (things, not crowd)", fontsize=10)
    return _figure("instance sizes", "instance sizes with COCO's small / medium / large edges", fig)


def _per_image_plot(per_image: dict) -> str:
    histogram = per_image["histogram"]
    fig = Figure(figsize=(5.2, 2.6))
    ax = fig.subplots()
    ax.bar([h["segments"] for h in histogram], [h["images"] for h in histogram], color=THING)
    ax.set_xlabel("segments in the image (the last bar: 100 or more)" if any(h["or_more"] for h in histogram)
                  else "segments in the image")
    ax.set_ylabel("images")
    ax.set_title("Segments per image", fontsize=10)
    return _figure("segments per image", "segments per image", fig)


def _comparison_plot(c: dict) -> str:
    rows = [r for r in c["per_class"] if any(r[name]["value"] is not None for name in c["sets"])]
    two = len(c["sets"]) == 2
    fig = Figure(figsize=(10.4 if two else 5.2, max(2.0, 0.24 * len(rows) + 0.9)))
    axes = fig.subplots(1, 2 if two else 1, sharey=True, squeeze=False)[0]
    y = np.arange(len(rows))
    for s, name in enumerate(c["sets"]):
        _interval_bars(axes[0], y + (0.15 * (2 * s - 1) if two else 0), [r[name] for r in rows], SET_COLOURS[name], name)
    axes[0].set_yticks(y, [r["name"] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlabel(c["metric"].upper())
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].set_title(f"{c['metric'].upper()} per class, 95% CI", fontsize=10)
    if two:
        _interval_bars(axes[1], y, [r["delta"] for r in rows], DELTA, "compare - pred")
        axes[1].axvline(0, color="#888", linewidth=1)
        axes[1].set_xlabel(f"delta {c['metric'].upper()}")
        axes[1].set_title("compare - pred, 95% CI", fontsize=10)
    return _figure("comparison", "per-class metric and deltas with bootstrap intervals", fig)


def _interval_bars(ax, y, estimates: list[dict], colour: str, label: str) -> None:
    value = np.array([np.nan if e["value"] is None else e["value"] for e in estimates])
    low = np.array([np.nan if e["low"] is None else e["low"] for e in estimates])
    high = np.array([np.nan if e["high"] is None else e["high"] for e in estimates])
    error = np.nan_to_num(np.vstack([value - low, high - value]).clip(min=0))
    ax.errorbar(value, y, xerr=error, fmt="o", color=colour, markersize=4, capsize=2, label=label)


# --- small HTML helpers ------------------------------------------------------------------------------


def _table(head: list[str], rows: list, raw: bool = False) -> str:
    """A table; cells escaped unless `raw` (cells this module built)."""
    def cell(value) -> str:
        text = str(value) if raw else escape(str(value))
        numeric = isinstance(value, (int, float)) or text.replace(",", "").replace(".", "").replace("%", "").isdigit()
        return f"<td class=\"n\">{text}</td>" if numeric else f"<td>{text}</td>"
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{header}</tr>{body}</table>"


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def _ci(estimate: dict, signed: bool = False) -> str:
    if estimate["value"] is None:
        return "&ndash;"
    value = f"{estimate['value']:+.3f}" if signed else f"{estimate['value']:.3f}"
    interval = "" if estimate["low"] is None else f" [{estimate['low']:.3f}, {estimate['high']:.3f}]"
    css = ""
    if signed and estimate["low"] is not None and (estimate["low"] > 0 or estimate["high"] < 0):
        css = " class=\"up\"" if estimate["low"] > 0 else " class=\"down\""  # the interval excludes 0
    return f"<span{css}>{value}{interval}</span>"
