"""``report.html``: one self-contained page per run (inline CSS, images as data URIs, no network).

Evaluate and train pages share their sections (model, curves, specs), so both read alike.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import yaml

from lesion_ray import figures

PAGE_FILE = "report.html"
PROBLEM_ROWS = 50  # rows listed per kind of problem; report.json has them all

_STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2430; margin: 0;
       background: #f4f5f7; }
header { background: #1d2430; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; font-weight: 600; }
header p { margin: 4px 0 0; color: #b8c0cc; }
main { padding: 8px 32px 40px; max-width: 1200px; }
section { background: #fff; border-radius: 8px; padding: 16px 20px; margin: 16px 0;
          box-shadow: 0 1px 2px rgba(0, 0, 0, .08); }
h2 { font-size: 17px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 14px 0 8px; }
table { border-collapse: collapse; }
th, td { padding: 4px 12px 4px 0; text-align: left; vertical-align: top; }
th { color: #5b6676; font-weight: 500; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.grid td, table.grid th { border-bottom: 1px solid #e6e8eb; padding: 5px 14px 5px 6px; }
.headline { font-size: 34px; font-weight: 600; margin: 0; }
.muted { color: #5b6676; }
.tiles { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; }
figcaption { font-size: 13px; color: #5b6676; }
.key { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -1px; }
.ok { color: #1a7f37; } .bad { color: #b42318; }
pre { background: #f4f5f7; padding: 10px; overflow-x: auto; font-size: 13px; }
img { max-width: 100%; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return esc(value)


def image(data: bytes, alt: str) -> str:
    """An embedded PNG or JPEG (told apart by their first bytes)."""
    mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    return f'<img alt="{esc(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def key_values(rows: Iterable[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{number(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def grid(header: list[str], rows: Iterable[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{number(v)}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool)
        else f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="grid"><tr>{head}</tr>{body}</table>'


def section(title: str, body: str, section_id: str) -> str:
    return f'<section id="{section_id}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, subtitle: str, sections: list[str]) -> str:
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)} · written {made} by lesion-ray</p></header>"
            f"<main>{''.join(sections)}</main></body></html>")


# --- Sections both pages use ---------------------------------------------------------------------


def curves_section(history: list[dict[str, Any]], task: int, curves: bytes | None = None) -> str:
    """The training curves (``curves``: the plot when the caller drew it already) and a table of every epoch."""
    if not history:
        return section("Training", '<p class="muted">No training history is recorded for this model '
                                   "(it was not trained by lesion-ray, or before histories were kept).</p>",
                       "training")
    best = max(history, key=lambda row: row["val_score"])
    columns = ["epoch", "train_loss", "val_loss", "val_score", "lr", "world_size", "epoch_time_s"]
    table = grid(columns, ([row.get(c, "") for c in columns] for row in history))
    body = (f"<p>Best epoch <b>{number(best['epoch'])}</b> of {len(history)}: validation score "
            f"<b>{number(best['val_score'])}</b> ({'thresholded Jaccard' if task == 1 else 'pooled Jaccard'} "
            "at the model's input size).</p>"
            f"{image(curves or figures.plot_history(history, task), 'training curves')}"
            f"<details><summary>Every epoch</summary>{table}</details>")
    return section("Training curves", body, "training")


def model_name(card: dict[str, Any]) -> str:
    """``name@version`` of a registry model; a model folder's location otherwise."""
    config = card.get("config", {})
    return f"{config.get('name', '?')}@{config['version']}" if config.get("version") else card["uri"]


def model_section(card: dict[str, Any], extra: Iterable[tuple[str, Any]] = ()) -> str:
    """A model's name, version, where it lies and how it was configured (:func:`registry.model_card`)."""
    config = card.get("config", {})
    rows = [("model", model_name(card)), ("location", card["uri"]), ("architecture", config.get("architecture", "?")),
            ("task", config.get("task", "?")), ("input size", config.get("input_size", "?")),
            ("threshold", config.get("threshold", "?")), *extra]
    best = {k: v for k, v in card.get("metrics", {}).items() if k.startswith("val_") or k == "epoch"}
    if best:
        rows.append(("at publishing", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in best.items())))
    return section("Model", key_values(rows), "model")


def specs_section(specs: list[tuple[str, dict[str, Any] | None]]) -> str:
    """The job specs (as YAML) that made what the page shows."""
    blocks = [f"<details><summary>{esc(title)}</summary><pre>{esc(yaml.safe_dump(data, sort_keys=False))}</pre>"
              "</details>" for title, data in specs if data]
    return section("Specs", "".join(blocks), "specs") if blocks else ""


# --- Evaluate's page -------------------------------------------------------------------------------


def scores_section(result: dict[str, Any]) -> str:
    scores = result["scores"]
    if result["task"] == 1:
        headline, label = scores["threshold_jaccard"], "thresholded Jaccard (per-image J < 0.65 counts 0)"
        table = key_values((name.replace("_", " "), value) for name, value in scores.items())
    else:
        headline, label = scores["jaccard"], "pooled Jaccard over images and attributes (ISIC 2018 Task 2)"
        table = key_values([("jaccard", scores["jaccard"]), ("dice", scores["dice"])]) + grid(
            ["attribute", "jaccard", "dice"],
            ([name, s["jaccard"], s["dice"]] for name, s in scores["per_attribute"].items()))
    body = (f'<p class="headline">{headline:.4f}</p><p class="muted">{esc(label)}, {result["scored"]:,} masks of '
            f'{result["images"]:,} images</p>{table}')
    return section("Official scores", body, "scores")


def confusion_section(cm: dict[str, Any]) -> str:
    """Pixels by truth (rows) and prediction (columns), as counts and as shares of each row."""
    labels = cm["labels"]
    head = "".join(f"<th>predicted {esc(label)}</th>" for label in labels)
    rows = "".join(
        f"<tr><th>truth {esc(label)}</th>" + "".join(
            f'<td class="num">{cm["counts"][i][j]:,} px<br><b>{cm["percent"][i][j]:.2f} %</b></td>'
            for j in range(len(labels))) + "</tr>" for i, label in enumerate(labels))
    body = (f'<table class="grid"><tr><th></th>{head}</tr>{rows}</table>'
            '<p class="muted">Percentages are shares of each truth row: the diagonal is each class\'s recall.</p>')
    return section("Pixel confusion matrix", body, "confusion")


def examples_section(groups: list[tuple[str, list[dict[str, Any]]]], task: int) -> str:
    """Tiles (see :func:`figures.comparison_tile`) grouped as worst, median and best."""
    if not groups:
        return ""
    legend = " ".join(f'<span class="key" style="background: rgb{colour}"></span> {label}' for colour, label in (
        (figures.AGREE, "predicted and true"), (figures.PREDICTED_ONLY, "predicted only"),
        (figures.MISSED, "missed")))
    scope = "lesion" if task == 1 else "any attribute (the five together: one attribute taken for another shows green)"
    body = f'<p class="muted">Each image beside its prediction against the truth, {scope}: {legend}.</p>'
    for title, tiles in groups:
        figures_html = "".join(
            f"<figure>{image(t['image'], t['id'])}<figcaption>{esc(t['id'])} · Jaccard {t['jaccard']:.3f}"
            f"{' · ' + esc(t['note']) if t['note'] else ''}</figcaption></figure>" for t in tiles)
        body += f'<h3>{esc(title)}</h3><div class="tiles">{figures_html}</div>'
    return section("Images by per-image Jaccard", body, "images")


def problems_section(result: dict[str, Any], descriptions: dict[str, str]) -> str:
    counts = result["problem_counts"]
    total = sum(counts.values())
    if not total:
        body = (f'<p class="ok">No problems: every one of the {result["masks"]:,} ground-truth masks has one '
                "readable prediction of the right size.</p>")
    else:
        body = f'<p class="bad">{total:,} of {result["masks"]:,} masks have a problem.</p>'
        for name, rows in result["problems"].items():
            if not rows:
                continue
            more = f" (the first {PROBLEM_ROWS}; report.json lists all)" if len(rows) > PROBLEM_ROWS else ""
            body += (f"<h3>{esc(name.replace('_', ' '))}: {len(rows):,}{more}</h3>"
                     f'<p class="muted">{esc(descriptions[name])}</p>'
                     + grid(["id", "mask", "detail"], ([r["id"], r["attribute"], r["detail"]]
                                                       for r in rows[:PROBLEM_ROWS])))
    if result.get("extra_predictions"):
        body += (f'<p class="muted">{result["extra_predictions"]:,} prediction files match no ground-truth mask '
                 "and were not scored.</p>")
    return section("Problems", body, "problems")
