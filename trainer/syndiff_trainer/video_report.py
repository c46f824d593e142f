"""The clinical video evaluation as one self-contained HTML page: every image inline (base64 PNG),
no scripts, no fetches. Plots with matplotlib (Agg, no display needed)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import cv2
import numpy as np

from .video_eval import GALLERY_SIZE

TRUTH_RGB = (40, 200, 60)  # outlines in the gallery: truth green ...
PRED_RGB = (255, 210, 0)  # ... prediction yellow


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the report needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(png: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{size} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def timeline_png(score: dict) -> bytes:
    """Truth present, polyp shown, Dice per frame, false alarms and first detection of one clip."""
    plt = _pyplot()
    n = score["frames"]
    x = np.arange(n)
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(8, 2.4), sharex=True, gridspec_kw={"height_ratios": [1, 1.6]})
    ax0.fill_between(x, 1.1, 1.9, where=np.array(score["positive"]), step="mid", color="tab:green", label="truth")
    ax0.fill_between(x, 0.1, 0.9, where=np.array(score["predicted"]), step="mid", color="gold", label="shown")
    alarms = np.zeros(n, bool)
    alarms[score["false_alarm_frames"]] = True
    ax0.fill_between(x, 0.1, 0.9, where=alarms, step="mid", color="tab:red", label="false alarm")
    ax0.set_yticks([0.5, 1.5], ["shown", "truth"])
    ax0.set_ylim(0, 2)
    ax1.plot(x, score["dice"], color="tab:blue", lw=1.2)
    for p in score["polyps"]:
        ax1.axvline(p["first_frame"], color="tab:green", ls=":", lw=1)
        if p["detected_at"] is not None:
            ax1.axvline(p["detected_at"], color="black", ls="--", lw=1)
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_ylabel("Dice")
    ax1.set_xlabel("frame (green dotted: polyp appears, black dashed: first detection)")
    ax0.set_title(score["name"], fontsize=10, loc="left")
    return _fig_png(fig)


def sweep_png(rows: list[dict], chosen: tuple[int, int] | None = None) -> bytes:
    """False alarms per minute against median time to first detection: one curve per hold M, one
    point per persistence N; the chosen setting in red."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for hold in sorted({r["hold"] for r in rows}):
        sub = [r for r in rows if r["hold"] == hold]
        ttd = [np.nan if r["ttd_ms_median"] is None else r["ttd_ms_median"] for r in sub]
        fa = [r["false_alarms_per_minute"] for r in sub]
        ax.plot(ttd, fa, "o-", label=f"hold {hold}")
        for r, t in zip(sub, ttd if chosen is None or hold == chosen[1] else []):  # label one curve
            ax.annotate(f"N={r['persist']}", (t, r["false_alarms_per_minute"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color="tab:red" if (r["persist"], hold) == chosen else "black")
    ax.set_xlabel("median time to first detection (ms)")
    ax.set_ylabel("false-alarm events per minute")
    ax.set_title("alarm gating: report from the Nth frame, hold M frames", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _fig_png(fig)


def gallery_png(image: np.ndarray, truth: np.ndarray, shown: np.ndarray) -> bytes:
    """The frame with the true outline (green) and the shown prediction's outline (yellow)."""
    out = image.copy()
    for mask, colour in ((truth, TRUTH_RGB), (shown, PRED_RGB)):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, max(2, image.shape[0] // 150), lineType=cv2.LINE_AA)
    return cv2.imencode(".png", cv2.cvtColor(out, cv2.COLOR_RGB2BGR))[1].tobytes()


def _fmt(v) -> str:
    if isinstance(v, dict) and "mean" in v and "ci95" in v:
        if v["mean"] is None:
            return "—"
        return f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def _table(rows: list[list], head: list[str] | None = None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>")
    return "\n".join(out + ["</table>"])


SUMMARY_ROWS = [
    ("dice_all", "Dice, all frames (mean, 95 % CI)"), ("dice_positive", "Dice, frames with a polyp"),
    ("iou_all", "IoU, all frames"), ("iou_positive", "IoU, frames with a polyp"),
    ("polyps", "polyps"), ("detected", "detected"), ("sensitivity", "per-polyp sensitivity"),
    ("ttd_frames", "time to first detection (frames)"), ("ttd_ms", "time to first detection (ms)"),
    ("false_alarm_events", "false-alarm events"), ("false_alarms_per_minute", "false alarms per minute"),
    ("fp_rate_polyp_free_frames", "frames with a prediction, of polyp-free frames"),
    ("flicker_pred", "flicker, prediction (mean 1 - IoU of consecutive masks)"),
    ("flicker_truth", "flicker, true masks (their own motion)"), ("latency_ms", "latency (ms, capture to polyps)"),
    ("e2e_fps", "end-to-end fps"), ("frames", "frames"), ("minutes", "minutes of video"), ("missed", "missed polyps"),
]


def write_report(out: str | Path, result: dict, runs: list, scores: list[dict], meta: dict) -> Path:
    """Write OUT/index.html (everything inline) and OUT/result.json; return the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = result["summary"]
    chosen = (result["settings"]["gate_persist"], result["settings"]["gate_hold"])
    parts = [f"<h1>Clinical video evaluation — {html.escape(meta.get('input', ''))}</h1>",
             "<h2>Summary</h2>", _table([[label, s.get(key)] for key, label in SUMMARY_ROWS], ["metric", "value"])]
    if result["gating_sweep"]:
        rows = result["gating_sweep"]
        parts += ["<h2>Alarm gating trade-off</h2>", _img(sweep_png(rows, chosen), "gating trade-off"),
                  _table([[r["persist"], r["hold"], r["false_alarms_per_minute"], r["false_alarm_events"],
                           r["ttd_frames_median"], r["ttd_frames_worst"], r["ttd_ms_median"], r["ttd_ms_worst"],
                           r["sensitivity"], r["dice_all"], r["flicker_pred"]] for r in rows],
                         ["persist N", "hold M", "false alarms/min", "events", "TTD median (frames)",
                          "TTD worst (frames)", "TTD median (ms)", "TTD worst (ms)", "sensitivity", "Dice",
                          "flicker"])]
    parts.append("<h2>Per clip</h2>")
    parts.append(_table([[c["name"], c["frames"], c["dice"], c["polyps"], c["detected"], c["ttd_frames"],
                          c["false_alarm_events"]] for c in result["clips"]],
                        ["clip", "frames", "Dice", "polyps", "detected", "TTD (frames)", "false alarms"]))
    parts += ['<div class="timelines">'] + [_img(timeline_png(sc), f"timeline {sc['name']}") for sc in scores] + ["</div>"]
    # The worst frame of each clip, worst first: one long bad stretch must not fill the gallery.
    worst = sorted(((run.worst[0], run.clip.name) for run in runs if run.worst), key=lambda t: t[0][0])[:GALLERY_SIZE]
    if worst:
        parts.append("<h2>Worst frames</h2><p>Green: truth. Yellow: what the overlay showed.</p><div class=gallery>")
        for (d, index, image, truth, shown), name in worst:
            parts.append(f"<figure>{_img(gallery_png(image, truth, shown), f'{name} frame {index}', 256)}"
                         f"<figcaption>{html.escape(name)}, frame {index}: Dice {d:.3f}</figcaption></figure>")
        parts.append("</div>")
    parts += ["<h2>Settings</h2>", _table([[k, v] for k, v in {**meta, **result["settings"]}.items()])]
    page = ("<!doctype html><html><head><meta charset=utf-8><title>syndiff-stream video evaluation</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:1em auto;color:#222}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}"
            "figure{display:inline-block;margin:4px}figcaption{font-size:12px}.timelines img{display:block}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>")
    path = out / "index.html"
    path.write_text(page)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return path
