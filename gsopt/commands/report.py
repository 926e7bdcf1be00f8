"""`gsopt report`: turn `gsopt bench` JSON into a markdown report and PNG charts, so a run
can be read (and committed) without rerunning it."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

from tabulate import tabulate

from gsopt.errors import GsoptError
from gsopt.results import BENCH_SCHEMA, check_output, read_json, write_atomic


def load_results(path: Path) -> dict[str, Any]:
    data = read_json(path, "no such results file", "a gsopt bench result")
    if data.get("schema") != BENCH_SCHEMA:
        raise GsoptError(f"{path}: not a gsopt bench result (schema {data.get('schema')!r})")
    return data


def stage_names(rows: list[dict[str, Any]]) -> list[str]:
    """The stages the rows timed, in pipeline order (bench writes them so)."""
    return list(dict.fromkeys(s for r in rows if r["error"] is None for s in r["stages"]))


def _point(row: dict[str, Any]) -> str:
    return f"{row['dtype']} {row['audio_seconds']:g}s B={row['batch']} N={row['max_new_tokens']}"


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown(results: list[tuple[str, dict[str, Any]]], charts: list[str]) -> str:
    lines = ["# gsopt bench report", ""]
    for name, data in results:
        env, settings = data["environment"], data["settings"]
        lines += [
            f"## {name}",
            "",
            f"Model `{settings['model']}`; device {env['device']}; torch {env['torch']}, "
            f"transformers {env['transformers']}, ibm-fms {env['ibm-fms']}; commit "
            f"{env['commit']}; {env['date']}.",
            f"Median / p90 of {settings['repeats']} timed runs after {settings['warmup_calls']} "
            f"warm-up call, {settings.get('order', 'row by row')}. "
            f"Decoding: {settings['decoding']}. LoRA: {settings['lora']}.",
            f"MBU: the decode step's bytes per second over the read ceiling, {data['read_ceiling']}"
            f" (column 'ceiling GB/s'). Peak memory: {data['memory_kind']}.",
            "",
        ]
        table = []
        for r in data["rows"]:
            if r["error"] is not None:
                table.append([_point(r), r["name"], f"error: {r['error']}"] + [""] * 11)
                continue
            e2e, sp = r["end_to_end"], r["speedup"]
            roof = r.get("roofline") or {}
            step = r["decode_ms_per_token"]
            table.append(
                [
                    _point(r),
                    r["name"],
                    f"{e2e['median_ms']:.1f} / {e2e['p90_ms']:.1f}",
                    _fmt(step and step["median_ms"]),
                    f"{e2e['rtfx']:.1f}",
                    f"{e2e['tokens_per_s']:.1f}",
                    _fmt(roof.get("achieved_GBps")),
                    _fmt(roof.get("ceiling_GBps"), ".1f"),
                    _fmt(roof.get("mbu") and 100 * roof["mbu"], ".1f", "%"),
                    f"{r['peak_memory_bytes'] / 2**20:.0f}",
                    f"{e2e['compile_s']:.1f}",
                    _fmt(sp["vs_eager"], suffix="x"),
                    _fmt(sp["vs_transformers-eager"], suffix="x"),
                    _fmt(sp["vs_transformers-static-compile"], suffix="x"),
                ]
            )
        lines += [
            tabulate(
                table,
                headers=[
                    "point",
                    "row",
                    "e2e ms (med / p90)",
                    "decode ms/tok",
                    "RTFx",
                    "tok/s",
                    "GB/s",
                    "ceiling GB/s",
                    "MBU",
                    "peak MiB",
                    "compile s",
                    "vs eager",
                    "vs HF eager",
                    "vs HF static+compile",
                ],
                tablefmt="github",
            ),
            "",
            "Per stage, median / p90 ms per call (peers: the encoder, projector and prefill are "
            "one transformers forward, shown as prefill).",
            "",
            tabulate(
                [
                    [_point(r), r["name"]]
                    + [
                        f"{r['stages'][s]['median_ms']:.2f} / {r['stages'][s]['p90_ms']:.2f}"
                        if s in r["stages"]
                        else "-"
                        for s in stage_names(data["rows"])
                    ]
                    for r in data["rows"]
                    if r["error"] is None
                ],
                headers=["point", "row", *stage_names(data["rows"])],
                tablefmt="github",
            ),
            "",
        ]
        speculative = [r for r in data["rows"] if r["error"] is None and r.get("speculation")]
        if speculative:
            lines += [
                "Speculative decoding, per call: tokens drafted and accepted, decoder forwards "
                "(the prompt's included) and tokens per forward of a row. Rows NAME@A use "
                "oracle drafts (the clip's own greedy output, a fraction A of its tokens kept);"
                " the row without @ uses the real CTC draft, which random weights make noise.",
                "",
                tabulate(
                    [
                        [
                            _point(r),
                            r["name"],
                            _fmt(r.get("draft_accuracy"), ".2f"),
                            f"{r['speculation']['drafted']:.1f}",
                            f"{r['speculation']['accepted']:.1f}",
                            f"{r['speculation']['forwards']:.1f}",
                            _fmt(r["speculation"]["tokens_per_forward"]),
                            _fmt(_vs(r, data["rows"], "compile-decoder"), suffix="x"),
                        ]
                        for r in speculative
                    ],
                    headers=[
                        "point",
                        "row",
                        "draft accuracy",
                        "drafted",
                        "accepted",
                        "forwards",
                        "tokens/forward",
                        "vs compile-decoder",
                    ],
                    tablefmt="github",
                ),
                "",
            ]
        notes = sorted({n for r in data["rows"] for n in r["notes"]})
        if notes:
            lines += ["Fallbacks on this machine:", *[f"- {n}" for n in notes], ""]
    if charts:
        lines += ["## Charts", "", *[f"![{c}]({c})" for c in charts]]
    else:
        lines += ["No row ran (every row has an error), so there are no charts."]
    return "\n".join(lines) + "\n"


def _vs(row: dict[str, Any], rows: list[dict[str, Any]], name: str) -> float | None:
    """End-to-end speed-up of `row` over the row called `name` at the same sweep point."""
    for other in rows:
        if other["name"] == name and other["error"] is None and _point(other) == _point(row):
            return other["end_to_end"]["median_ms"] / row["end_to_end"]["median_ms"]
    return None


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


# Readable at 100% zoom: labels at 9 pt, a row of bars 0.32 inch tall.
FONT = 9
ROW_INCHES = 0.32
OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)}  # a legend beside the bars


def _rows_figure(plt, rows: int):
    fig, ax = plt.subplots(figsize=(9, 1.2 + ROW_INCHES * rows))
    ax.tick_params(labelsize=FONT)
    return fig, ax


def _wide(values: list[float]) -> bool:
    """A range wide enough that a linear axis would flatten the small bars."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > 20


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


def charts(rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """`figures` as PNG files' bytes."""
    plt = _pyplot()
    out = {}
    for name, fig in figures(rows).items():
        out[name] = _png(fig)
        plt.close(fig)
    return out


def figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Time per stage and speed-ups as horizontal bars, grouped by sweep point (one bar a
    recipe; a log axis when the range is wide), MBU against the read ceiling, and, for
    oracle-draft rows, speed-up against draft accuracy as one line per sweep point. No
    charts when no row ran."""
    plt = _pyplot()
    ok = [r for r in rows if r["error"] is None]
    if not ok:
        return {}
    out: dict[str, Any] = {}
    ordered = sorted(ok, key=lambda r: (_point(r), r["name"]))
    labels = [f"{r['name']}  [{_point(r)}]" for r in ordered]

    fig, ax = _rows_figure(plt, len(ordered))
    left = [0.0] * len(ordered)
    for stage in stage_names(ordered):
        values = [r["stages"].get(stage, {"median_ms": 0.0})["median_ms"] for r in ordered]
        ax.barh(labels, values, left=left, label=stage)
        left = [a + b for a, b in zip(left, values, strict=True)]
    if _wide(left):
        ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("median ms per call (stacked by stage)", fontsize=FONT)
    ax.set_title("Time per stage (transformers rows: one forward, shown as prefill)", fontsize=FONT)
    ax.legend(fontsize=FONT, **OUTSIDE)
    out["stages.png"] = fig

    recipes = [r for r in ordered if r["kind"] == "recipe"]
    if recipes:
        refs = ("vs_eager", "vs_transformers-eager", "vs_transformers-static-compile")
        fig, ax = _rows_figure(plt, len(recipes) * 1.5)
        height = 0.8 / len(refs)
        for i, ref in enumerate(refs):
            ax.barh(
                [j + i * height for j in range(len(recipes))],
                [r["speedup"][ref] or 0.0 for r in recipes],
                height,
                label=ref.replace("vs_", "vs "),
            )
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks([j + height for j in range(len(recipes))])
        ax.set_yticklabels([f"{r['name']}  [{_point(r)}]" for r in recipes], fontsize=FONT)
        ax.invert_yaxis()
        ax.set_xlabel("speed-up (ratio of end-to-end medians)", fontsize=FONT)
        ax.set_title("Speed-up per recipe", fontsize=FONT)
        ax.legend(fontsize=FONT, **OUTSIDE)
        out["speedup.png"] = fig

    oracle = [r for r in ok if r.get("draft_accuracy") is not None]
    if oracle:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.tick_params(labelsize=FONT)
        lines = sorted({(r["name"].partition("@")[0], _point(r)) for r in oracle})
        for name, point in lines:
            mine = sorted(
                (r for r in oracle if r["name"].startswith(f"{name}@") and _point(r) == point),
                key=lambda r: r["draft_accuracy"],
            )
            ax.plot(
                [r["draft_accuracy"] for r in mine],
                [_vs(r, rows, "compile-decoder") or 0.0 for r in mine],
                "o-",
                label=f"{name} [{point}]",
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("draft accuracy (fraction of the greedy tokens kept)", fontsize=FONT)
        ax.set_ylabel("end-to-end speed-up vs compile-decoder", fontsize=FONT)
        ax.set_title("Speculative decoding against draft accuracy", fontsize=FONT)
        ax.legend(fontsize=FONT)
        out["speculation.png"] = fig

    measured = [r for r in ordered if r.get("roofline")]
    if not measured:  # no decode step (Granite Speech 5.0): no roofline to draw
        return out
    fig, ax = _rows_figure(plt, len(measured))
    values = [100 * r["roofline"]["mbu"] for r in measured]
    bars = ax.barh([f"{r['name']}  [{_point(r)}]" for r in measured], values)
    ax.bar_label(bars, labels=[f"{v:.1f}%" for v in values], fontsize=FONT)
    ax.axvline(100.0, color="red", linestyle="--", label="read ceiling (100%)")
    ax.set_xlim(0, 115)
    ax.invert_yaxis()
    ax.set_xlabel("decode MBU, % of the measured read ceiling", fontsize=FONT)
    ax.set_title("Decode bandwidth utilisation", fontsize=FONT)
    ax.legend(fontsize=FONT, **OUTSIDE)
    out["mbu.png"] = fig
    return out


def run(args: argparse.Namespace) -> int:
    results = [(Path(p).name, load_results(Path(p))) for p in args.results]
    out = check_output(args.out, folder=True, inputs=args.results)
    out.mkdir(parents=True, exist_ok=True)
    images = charts([r for _, data in results for r in data["rows"]])
    for name, data in images.items():
        write_atomic(out / name, data)
    write_atomic(out / "report.md", markdown(results, list(images)))
    print(f"wrote {out / 'report.md'} and {', '.join(images)}")
    return 0


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description="Turn `gsopt bench` JSON files into report.md and PNG charts (time per "
        "stage, speed-ups, decode bandwidth use, speculation against draft accuracy).",
    )
    parser.add_argument("results", nargs="+", help="gsopt bench JSON files")
    parser.add_argument(
        "--out", default="bench-report", metavar="DIR", help="folder for report.md and PNGs"
    )
    parser.set_defaults(run=run)
    return parser
