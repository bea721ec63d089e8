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
    names = {c["id"]: c["name"] for c in report.get("categories", [])}
    if "health" in report:
        parts.append(_health(report["health"]))
    if "contents" in report:
        parts.append(_contents(report["contents"]))
    if "errors" in report:
        parts.append(_errors(report["errors"], names))
    if "comparison" in report:
        parts.append(_comparison(report["comparison"]))
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
    data.get("errors", {}).pop("thumbnails", None)
    return data


def _health(h: dict) -> str:
    if not h["findings"]:
        verdict = f"<p>No problem found by the {len(h['checked'])} checks run.</p>"
    else:
        verdict = "<p>" + ", ".join(f"{group}: {count:,}" for group, count in h["counts"].items()) + "</p>"
    rows = [(f["group"], f["severity"], f["check"], f["split"] or "across splits", f"{f['count']:,}",
             _ids(f["ids"], f["count"]), f["detail"]) for f in h["findings"]]
    table = _table(["group", "severity", "check", "split", "count", "ids (first)", "what"], rows) if rows else ""
    checked = f"<p class=\"small\">Checks run: {escape(', '.join(h['checked']))}.</p>"
    return f"<h2>Health</h2>{verdict}{table}{checked}"


def _ids(ids: list, count: int) -> str:
    shown = ", ".join(str(i) for i in ids[:10])
    return shown + (f" ... ({count - 10:,} more)" if count > 10 else "")


def _errors(e: dict, names: dict) -> str:
    def name(category_id) -> str:
        return names.get(int(category_id), str(category_id)) if str(category_id).lstrip("-").isdigit() else str(category_id)
    parts = ["<h2>Model errors</h2>"]
    if e.get("pq"):
        pq = e["pq"]
        summary = _table(["", "PQ", "SQ", "RQ", "classes"], [
            (k, f"{pq[k]['pq']:.4f}", f"{pq[k]['sq']:.4f}", f"{pq[k]['rq']:.4f}", pq[k]["n"]) for k in ("All", "Things", "Stuff")])
        miou = f"<p>Semantic mIoU: {e['miou']['miou']:.4f}</p>" if isinstance(e.get("miou"), dict) and "miou" in e["miou"] else ""
        split = _table(["panoptic error", "false negatives", "false positives", "PQ if fixed (gain)"], [
            (kind.replace("_", " "), f"{v['fn']:,}", f"{v['fp']:,}", f"{v['pq_cost']:+.4f}")
            for kind, v in e["panoptic_errors"].items()])
        parts.append(f"<h3>Panoptic quality</h3>{summary}{miou}<h3>Where PQ is lost</h3>{split}")
    ap = e["ap"]["summary"]
    parts.append("<h3>Mask AP</h3>" + _table(["AP", "AP50", "AP75", "APs", "APm", "APl"],
                                              [tuple(f"{ap[k]:.4f}" for k in list(ap)[:6])]))
    tide = e["tide"]
    parts.append(f"<h3>TIDE errors</h3><p>AP50 {tide['ap50']:.2f} (TIDE's). dAP: the AP50 gained by fixing one "
                 "type alone.</p>" + _table(["type", "count", "dAP"], [
                     (k, f"{tide['counts'][k]:,}", f"{tide['delta_ap'][k]:.2f}") for k in tide["counts"]]))
    parts.append("<div class=\"plots\">" + _tide_plot(tide) + _confusion_plot(e["confusion"], name)
                 + _calibration_plot(e["calibration"]) + _pr_plot(e["ap"]["pr_curves"], name) + "</div>")
    thumbs = e.get("thumbnails", {})
    worst = e.get("worst_images", [])[:6]
    if worst:
        parts.append("<h3>Worst images by PQ</h3>" + _strips(
            [(w["image_id"], f"image {w['image_id']}: PQ {w['pq']:.3f} (TP {w['tp']}, FP {w['fp']}, FN {w['fn']})")
             for w in worst], thumbs))
    candidates = e.get("candidates", [])
    parts.append(f"<h3>Label-error candidates</h3><p>{len(candidates):,} candidates, strongest evidence first; as a "
                 "COCO file for review: label-errors.json.</p>")
    if candidates:
        rows = [(c["kind"].replace("_", " "), c["image_id"], name(c["gt_category_id"]) if c.get("gt_category_id") else "-",
                 name(c["pred_category_id"]), f"{c['score']:.3f}", "-" if c.get("iou") is None else f"{c['iou']:.3f}",
                 f"{c['evidence']:.3f}") for c in candidates[:50]]
        parts.append(_table(["kind", "image", "labelled", "predicted", "score", "IoU", "evidence"], rows))
        parts.append(_strips([(c["image_id"], f"image {c['image_id']}: {c['kind'].replace('_', ' ')}")
                              for c in candidates[:6]], thumbs))
    return "".join(parts)


def _strips(items: list[tuple[int, str]], thumbs: dict) -> str:
    figures = [f"<figure><img alt=\"image {image_id}\" src=\"data:image/jpeg;base64,{thumbs[str(image_id)]}\">"
               f"<figcaption>{escape(caption)}</figcaption></figure>"
               for image_id, caption in items if str(image_id) in thumbs]
    return f"<p>Left: ground truth, right: predictions.</p><div class=\"thumbs\">{''.join(figures)}</div>" if figures else ""


def _tide_plot(tide: dict) -> str:
    fig = Figure(figsize=(5.2, 2.6))
    ax = fig.subplots()
    kinds = list(tide["delta_ap"])
    ax.bar(kinds, [tide["delta_ap"][k] for k in kinds], color=THING)
    ax.set_ylabel("dAP50")
    ax.set_title("TIDE: AP50 gained by fixing each error type", fontsize=10)
    return _figure("tide", "TIDE's error types and their dAP", fig)


def _confusion_plot(confusion: dict, name) -> str:
    matrix = np.asarray(confusion["matrix"], np.float64)
    labels = [name(label) for label in confusion["labels"]]
    fig = Figure(figsize=(max(4.0, 0.3 * len(labels) + 2), max(3.5, 0.3 * len(labels) + 1.5)))
    ax = fig.subplots()
    ax.imshow(np.log1p(matrix), cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("ground truth")
    ax.set_ylabel("prediction")
    ax.set_title(f"Confusion at IoU {confusion['iou']}, score >= {confusion['min_score']}", fontsize=10)
    return _figure("confusion", "matched segments by class (log colour); background: unmatched", fig)


def _calibration_plot(calibration: dict) -> str:
    bins = [b for b in calibration["bins"] if b["count"]]
    fig = Figure(figsize=(3.6, 3.4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#888", linestyle="--", linewidth=1)
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color=THING)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("score")
    ax.set_ylabel("share that is a true positive")
    ax.set_title(f"Calibration: ECE {calibration['ece']:.3f}", fontsize=10)
    return _figure("calibration", "reliability of the scores (10 bins)", fig)


def _pr_plot(curves: dict, name) -> str:
    fig = Figure(figsize=(4.4, 3.4))
    ax = fig.subplots()
    for category_id, precision in curves["precision"].items():
        if precision is not None:
            ax.plot(curves["recall"], precision, linewidth=1, label=name(category_id))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"Precision-recall per class, IoU {curves['iou']}", fontsize=10)
    return _figure("precision-recall", "precision at COCO's 101 recall points", fig)


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
