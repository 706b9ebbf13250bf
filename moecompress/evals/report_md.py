"""``report.md`` beside ``report.json``: what a person reads after a run.

Sections (each only when its data is in the report): model size and bits per parameter, quality before/after per
evaluate stage, stages with their time and decisions, timings and peak memory, calibration, super experts, plots
(expert usage per layer and domain, kept experts, bit widths, and any PNG a stage wrote), versions and recipe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moecompress.evals.tables import format_value, lower_is_better

PLOTS_FOLDER = "plots"


def human_bytes(count: Any) -> str:
    if not isinstance(count, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return "-"


def human_count(count: Any) -> str:
    if not isinstance(count, (int, float)):
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(int(count))


def _ratio(before: Any, after: Any) -> str:
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and after:
        return f"{before / after:.2f}x smaller" if after <= before else f"{after / before:.2f}x larger"
    return "-"


def _model_section(model: dict[str, Any]) -> list[str]:
    lines = ["## Model", ""]
    if model.get("source"):
        lines += [f"Source: `{model['source']}`", ""]
    lines += ["| | before | after | change |", "|---|---:|---:|---:|"]
    params_before, params_after = model.get("parameters_before"), model.get("parameters_after")
    bytes_before, bytes_after = model.get("bytes_before"), model.get("bytes_after")
    lines.append(f"| parameters | {human_count(params_before)} | {human_count(params_after)} | "
                 f"{_ratio(params_before, params_after)} |")
    lines.append(f"| size | {human_bytes(bytes_before)} | {human_bytes(bytes_after)} | "
                 f"{_ratio(bytes_before, bytes_after)} |")
    bits = model.get("bits_per_parameter")
    if isinstance(bits, dict):
        lines.append(f"| bits per parameter | {format_value(bits.get('before'))} | {format_value(bits.get('after'))} | |")
    elif isinstance(bits, (int, float)):
        bits_before = model.get("bits_per_parameter_before")
        before_cell = f" {bits_before:.3f} " if isinstance(bits_before, (int, float)) else " "
        lines.append(f"| bits per parameter |{before_cell}| {bits:.3f} | |")
    return lines + [""]


def _delta_text(metric: str, delta: Any) -> str:
    if not isinstance(delta, (int, float)):
        return "-"
    if delta == 0:
        return "0"
    better = (delta < 0) if lower_is_better(metric) else (delta > 0)
    return f"{delta:+.3f} {'(better)' if better else '(worse)'}"


def quality_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown rows of an evaluate stage's ``{"before", "after", "delta"}`` metrics."""
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    delta = metrics.get("delta") or {}
    lines = ["| task | metric | before | after | delta |", "|---|---|---:|---:|---:|"]
    for task in sorted(set(before) | set(after)):
        task_metrics = list(dict.fromkeys([*before.get(task, {}), *after.get(task, {})]))
        for metric in task_metrics:
            value_before = before.get(task, {}).get(metric)
            value_after = after.get(task, {}).get(metric)
            change = delta.get(task, {}).get(metric)
            if change is None and isinstance(value_before, (int, float)) and isinstance(value_after, (int, float)):
                change = value_after - value_before
            lines.append(f"| {task} | {metric} | {format_value(value_before)} | {format_value(value_after)} | "
                         f"{_delta_text(metric, change)} |")
    return lines


def decision_summary(decisions: dict[str, Any]) -> str:
    """One line per stage: what it decided, in numbers (the full record stays in report.json)."""
    parts = []
    kept = decisions.get("kept_experts")
    if isinstance(kept, dict) and kept:
        counts = [len(ids) for ids in kept.values()]
        parts.append(f"kept experts per layer {min(counts)}-{max(counts)} ({sum(counts)} in all)")
    bits = decisions.get("bit_widths")
    if isinstance(bits, dict) and bits:
        flat = [float(b) for layer_bits in bits.values() for b in layer_bits]
        if flat:
            parts.append(f"bits per expert: mean {sum(flat) / len(flat):.2f}, {min(flat):g}-{max(flat):g}")
    other = [key for key in decisions if key not in ("kept_experts", "bit_widths")]
    if other:
        parts.append("also: " + ", ".join(other))
    return "; ".join(parts) or "-"


def applied_bits(stage: dict[str, Any]) -> str | None:
    """What a quantiser applied when it differs from its ``bits`` option (an earlier stage's bit map decided the
    widths): ``"2-4 per expert (mean 3.00), from the bit map"``; None when the option is what was applied."""
    widths = [bits for layer_bits in ((stage.get("decisions") or {}).get("bit_widths") or {}).values()
              for bits in layer_bits]
    nominal = (stage.get("options") or {}).get("bits")
    if not isinstance(nominal, (int, float)) or not widths or set(widths) == {nominal}:
        return None
    span = f"{min(widths):g}-{max(widths):g}" if min(widths) != max(widths) else f"{widths[0]:g}"
    return f"{span} per expert (mean {sum(widths) / len(widths):.2f}), from the bit map"


def applied_options(stage: dict[str, Any]) -> dict[str, Any]:
    """A stage's options as they were applied: a quantiser's ``bits`` replaced by the bit map it followed."""
    options = dict(stage.get("options") or {})
    applied = applied_bits(stage)
    if applied is not None:
        options["bits"] = applied
    return options


def _stages_section(stages: list[dict[str, Any]]) -> list[str]:
    lines = ["## Stages", "", "| # | method | seconds | options (as applied) | decisions |", "|---:|---|---:|---|---|"]
    for index, stage in enumerate(stages, start=1):
        options = json.dumps(applied_options(stage), sort_keys=True)
        options = options if len(options) <= 120 else options[:117] + "..."
        seconds = stage.get("seconds")
        lines.append(f"| {index} | {stage.get('method', '?')} | {format_value(seconds) if seconds is not None else '-'} | "
                     f"`{options}` | {decision_summary(stage.get('decisions') or {})} |")
    return lines + [""]


def _plots(report: dict[str, Any], out_dir: Path) -> list[tuple[str, str]]:
    """Draw every plot the report has data for; ``[(caption, path relative to out_dir)]``."""
    from moecompress.evals import plots  # imports matplotlib (heavy): only when a report is drawn

    drawn: list[tuple[str, str]] = []
    plot_dir = out_dir / PLOTS_FOLDER
    usage = (report.get("calibration") or {}).get("expert_usage_by_domain")
    num_experts = None
    if isinstance(usage, dict) and usage:
        path = plots.expert_usage_heatmaps(usage, plot_dir / "expert_usage.png")
        drawn.append(("Expert usage per layer and calibration domain", str(path.relative_to(out_dir))))
        first_domain = next(iter(usage.values()))
        num_experts = len(first_domain[0]) if first_domain and first_domain[0] else None
    drawn_bit_maps: set[str] = set()
    for index, stage in enumerate(report.get("stages") or [], start=1):
        decisions = stage.get("decisions") or {}
        method = stage.get("method", "stage")
        kept = decisions.get("kept_experts")
        own_plots = stage.get("plots") or []  # a pruning stage's own plot already shows its kept-experts map
        if isinstance(kept, dict) and kept and not own_plots:
            path = plots.kept_experts_map(kept, plot_dir / f"stage{index}_{method}_kept_experts.png",
                                          num_experts=num_experts, title=f"Kept experts ({method})")
            drawn.append((f"Kept experts, stage {index} ({method})", str(path.relative_to(out_dir))))
        bits = decisions.get("bit_widths")
        bits_key = json.dumps(bits, sort_keys=True)
        if isinstance(bits, dict) and bits and bits_key not in drawn_bit_maps:  # a quantiser repeats its allocator's map
            drawn_bit_maps.add(bits_key)
            path = plots.bit_width_map(bits, plot_dir / f"stage{index}_{method}_bit_widths.png",
                                       title=f"Bits per expert ({method})")
            drawn.append((f"Bit widths, stage {index} ({method})", str(path.relative_to(out_dir))))
        for stage_plot in stage.get("plots") or []:
            drawn.append((f"Stage {index} ({method}): {Path(stage_plot).stem}", str(stage_plot)))
    return drawn


def write_report_markdown(report: dict[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` (and its PNG plots under ``out_dir/plots/``); return the markdown's path.

    report: the run record (``report.json``); missing keys are skipped, never an error.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = report.get("model") or {}
    lines = ["# moecompress run report", ""]
    stages = report.get("stages") or []
    if stages:
        lines += ["Pipeline: " + " -> ".join(f"`{stage.get('method', '?')}`" for stage in stages), ""]
    if model:
        lines += _model_section(model)

    evaluations = [(index, stage) for index, stage in enumerate(stages, start=1) if stage.get("method") == "evaluate"]
    for index, stage in evaluations:
        metrics = stage.get("metrics") or {}
        if not (metrics.get("before") or metrics.get("after")):
            continue
        title = "## Quality: original vs compressed" + (f" (stage {index})" if len(evaluations) > 1 else "")
        limit = (stage.get("options") or {}).get("limit")
        lines += [title, ""]
        if limit:
            lines += [f"At most {limit} documents per task.", ""]
        lines += quality_table(metrics) + [""]

    if stages:
        lines += _stages_section(stages)

    timings = report.get("timings") or {}
    peak = report.get("peak_memory_bytes")
    if timings or peak:
        lines += ["## Time and memory", ""]
        if timings:
            lines += ["| step | seconds |", "|---|---:|"]
            lines += [f"| {name} | {format_value(seconds)} |" for name, seconds in timings.items()]
            lines.append("")
        if peak:
            lines += [f"Peak memory: {human_bytes(peak)}", ""]

    calibration = report.get("calibration") or {}
    described = {key: calibration[key] for key in ("num_samples", "seq_len", "seed", "sha256") if key in calibration}
    if described or calibration.get("files"):
        lines += ["## Calibration", ""]
        lines += [f"- {key}: `{value}`" for key, value in described.items()]
        files = calibration.get("files") or []
        if files:
            lines.append("- files: " + ", ".join(f"`{name}`" for name in files))
        lines.append("")

    super_experts = report.get("super_experts")
    if super_experts:
        lines += ["## Super experts (always kept)", "",
                  ", ".join(f"layer {layer} expert {expert}" for layer, expert in super_experts), ""]

    drawn = _plots(report, out_dir)
    if drawn:
        lines += ["## Plots", ""]
        for caption, path in drawn:
            lines += [f"### {caption}", "", f"![{caption}]({path})", ""]

    versions = report.get("versions") or {}
    if versions:
        lines += ["## Versions", "", ", ".join(f"{name} {version}" for name, version in versions.items()), ""]
    recipe = report.get("recipe")
    if recipe:
        lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=False, default=str), "```", ""]

    markdown_file = out_dir / "report.md"
    markdown_file.write_text("\n".join(lines))
    return markdown_file
