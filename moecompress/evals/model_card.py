"""``README.md`` in every output folder: a model card in the Hugging Face format (YAML metadata, then markdown).

What it holds, from the run's ``report.json``: the base model (its card's license and metadata when it has them),
what each stage decided, the quality before and after, the size, how to load the folder, the recipe and the
moecompress version, and the report's plots. The loaders listed are only those shown to work for that kind of
folder: for a compress output, plain transformers when the folder is a plain Hugging Face checkpoint and
``import moecompress`` + transformers when it is the native format (both covered by the tests, which run the card's
own snippet); for an export, the commands the export recorded in ``export_report.json`` (the export decides which
consumers it names) and its notes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from moecompress.evals.report_md import (
    PLOTS_FOLDER,
    applied_bits,
    decision_summary,
    human_bytes,
    human_count,
    quality_table,
)
from moecompress.version import __version__

CARD_FILE = "README.md"
# The YAML metadata block the hub reads at the top of a model card (huggingface_hub.repocard's pattern).
FRONT_MATTER = re.compile(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(?:\r?\n|$)")
# Methods that make a model "quantized" for the hub's base_model_relation; the others edit experts.
QUANTIZING_METHODS = ("rtn", "gptq", "camera_q", "mcmoe_pmq")


def source_card(folder: Path | None) -> tuple[dict[str, Any], str | None]:
    """The base model's card: ``(metadata, first heading)``; empty when it has none or no front matter."""
    if folder is None or not (Path(folder) / CARD_FILE).is_file():
        return {}, None
    text = (Path(folder) / CARD_FILE).read_text(encoding="utf-8", errors="replace")
    heading = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("# ")), None)
    match = FRONT_MATTER.match(text)
    try:
        metadata = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:  # a broken header is the base model's problem: the card is written without it
        metadata = None
    return (metadata if isinstance(metadata, dict) else {}), heading


def _is_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not Path(source).exists() and not source.startswith((".", "~"))


def card_metadata(report: dict[str, Any], base_metadata: dict[str, Any]) -> dict[str, Any]:
    """The YAML header: base model (hub ids only), its license and language, tags, the relation to the base."""
    source = str((report.get("model") or {}).get("source") or "")
    methods = [stage.get("method", "") for stage in report.get("stages") or []]
    metadata: dict[str, Any] = {}
    if _is_hub_id(source):
        metadata["base_model"] = source
        metadata["base_model_relation"] = "quantized" if set(methods) & set(QUANTIZING_METHODS) else "finetune"
    for key in ("license", "license_name", "license_link", "language", "pipeline_tag", "datasets"):
        if base_metadata.get(key):
            metadata[key] = base_metadata[key]
    metadata["library_name"] = "transformers"
    metadata.setdefault("pipeline_tag", "text-generation")
    tags = ["moecompress", "mixture-of-experts", *[method for method in methods if method != "evaluate"]]
    metadata["tags"] = list(dict.fromkeys([*tags, *(base_metadata.get("tags") or [])]))
    return metadata


def _title(report: dict[str, Any], base_heading: str | None) -> str:
    source = str((report.get("model") or {}).get("source") or "model")
    name = base_heading or Path(source.rstrip("/")).name or source
    return f"# {name}, compressed with moecompress"


def _summary(report: dict[str, Any]) -> list[str]:
    model = report.get("model") or {}
    stages = [stage for stage in report.get("stages") or [] if stage.get("method") != "evaluate"]
    steps = " -> ".join(f"`{stage.get('method')}`" for stage in stages) or "no change (a profile of the model)"
    lines = [f"`{model.get('source', '?')}` compressed by moecompress {__version__}: {steps}."]
    before, after = model.get("bytes_before"), model.get("bytes_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and after:
        lines.append(f"In memory: {human_bytes(before)} -> {human_bytes(after)} ({before / after:.2f}x smaller), "
                     f"{human_count(model.get('parameters_before'))} -> {human_count(model.get('parameters_after'))} "
                     f"parameters, {model.get('bits_per_parameter', 0):.2f} bits per parameter.")
    return lines + [""]


def _quality_section(report: dict[str, Any], *, measured_on_native: bool = False) -> list[str]:
    lines: list[str] = []
    for stage in report.get("stages") or []:
        metrics = stage.get("metrics") or {}
        if stage.get("method") != "evaluate" or not (metrics.get("before") or metrics.get("after")):
            continue
        limit = (stage.get("options") or {}).get("limit")
        lines += ["## Quality before and after", "",
                  "lm-eval on the same tasks, the original and this model"
                  + (f", at most {limit} documents per task (a smoke test, not a quality claim)." if limit else ".")
                  + (" Measured on the native folder this export was written from." if measured_on_native else ""),
                  ""]
        lines += quality_table(metrics) + [""]
    return lines


def _size_section(report: dict[str, Any], folder: Path, export_report: dict[str, Any] | None) -> list[str]:
    model = report.get("model") or {}
    on_disk = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    lines = ["## Size", "", "| | original | this model |", "|---|---:|---:|",
             f"| parameters | {human_count(model.get('parameters_before'))} | "
             f"{human_count(model.get('parameters_after'))} |",
             f"| in memory | {human_bytes(model.get('bytes_before'))} | {human_bytes(model.get('bytes_after'))} |"]
    bits_before, bits_after = model.get("bits_per_parameter_before"), model.get("bits_per_parameter")
    if isinstance(bits_before, (int, float)) and isinstance(bits_after, (int, float)):
        lines.append(f"| bits per parameter | {bits_before:.2f} | {bits_after:.2f} |")
    if export_report is not None and isinstance(export_report.get("bits_per_parameter"), (int, float)):
        lines.append(f"| bits per parameter, this export | | {export_report['bits_per_parameter']:.2f} |")
    if on_disk:
        lines.append(f"| safetensors on disk | | {human_bytes(on_disk)} |")
    return lines + [""]


def _stages_section(report: dict[str, Any]) -> list[str]:
    stages = report.get("stages") or []
    if not stages:
        return []
    lines = ["## What each stage decided", ""]
    for index, stage in enumerate(stages, start=1):
        method = stage.get("method", "?")
        seconds = stage.get("seconds")
        what = decision_summary(stage.get("decisions") or {})
        if method == "evaluate":
            what = "scored the original and the compressed model (table above)"
        applied = applied_bits(stage)
        if applied is not None:
            what += f"; applied {applied} (its `bits` option is the width of anything the map does not name)"
        lines.append(f"{index}. `{method}`" + (f" ({seconds:.1f} s)" if isinstance(seconds, (int, float)) else "")
                     + f": {what}")
    original, after = report.get("super_experts") or [], report.get("super_experts_after") or []
    if original:
        renamed = len(after) == len(original)  # the same experts, renumbered by the edits
        lines += ["", "Super experts (never pruned, kept through every edit): " + ", ".join(
            f"layer {layer} expert {expert}" + (f" (expert {new[1]} here)" if renamed and new[1] != expert else "")
            for (layer, expert), new in zip(original, after if renamed else original)) + "."]
    return lines + [""]


def native_loader(folder: Path, load_path: Path | None = None) -> tuple[str, str]:
    """``(explanation, python snippet)`` for a compress output: plain transformers for a plain Hugging Face
    checkpoint, ``import moecompress`` first for the native format (``quantization_config`` names moecompress).
    ``load_path``: where the folder will be read from (a run writes its card before moving the folder there)."""
    config = json.loads((folder / "config.json").read_text())
    native = (config.get("quantization_config") or {}).get("quant_method") == "moecompress"
    path = str(Path(load_path or folder).resolve())
    lines = ["import moecompress  # registers the native format (packed experts) with transformers"] if native else []
    lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"model = AutoModelForCausalLM.from_pretrained({path!r})",
              f"tokenizer = AutoTokenizer.from_pretrained({path!r})"]
    why = ("The native moecompress format: plain `from_pretrained` loads it once `moecompress` is imported "
           "(installed with `pip install moecompress`)." if native else
           "A plain Hugging Face checkpoint: transformers loads it as it is.")
    return why, "\n".join(lines)


def _load_section(folder: Path, export_report: dict[str, Any] | None, load_path: Path | None) -> list[str]:
    lines = ["## How to load it", ""]
    if export_report is None:
        if not (folder / "config.json").is_file():
            return lines + ["This run only profiled the model; it wrote no model copy.", ""]
        why, snippet = native_loader(folder, load_path)
        return lines + [why, "", "```python", snippet, "```", ""]
    lines += [f"A `{export_report.get('format')}` export of `{export_report.get('source')}`. The commands the "
              "export recorded for its consumers (`export_report.json`), and its notes:", ""]
    for consumer, command in (export_report.get("load") or {}).items():
        lines += [f"- {consumer}:", "", "  ```bash", f"  {command}", "  ```", ""]
    if export_report.get("format") == "compressed-tensors" and "transformers" not in (export_report.get("load") or {}):
        lines += ["**Not plain transformers**: this folder is written for vLLM only (the notes say why).", ""]
    lines += [f"Note: {note}" for note in export_report.get("notes") or []]
    return lines + [""]


def _plots_section(report: dict[str, Any], folder: Path) -> list[str]:
    plots = sorted((folder / PLOTS_FOLDER).glob("*.png")) if (folder / PLOTS_FOLDER).is_dir() else []
    if not plots:
        return []
    lines = ["## Plots", "", "From the run's report (`report.md` has them all with captions).", ""]
    return lines + [f"![{plot.stem}]({PLOTS_FOLDER}/{plot.name})" for plot in plots] + [""]


def _recipe_section(report: dict[str, Any]) -> list[str]:
    recipe = report.get("recipe")
    if not recipe:
        return []
    calibration = report.get("calibration") or {}
    lines = ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    if calibration.get("sha256"):
        lines += [f"Calibration: {calibration.get('num_samples')} x {calibration.get('seq_len')} tokens "
                  f"(sha256 `{calibration['sha256'][:16]}...`) from "
                  + (", ".join(f"`{name}`" for name in calibration.get("files") or []) or "-") + ".", ""]
    return lines


def _base_section(report: dict[str, Any], base_metadata: dict[str, Any]) -> list[str]:
    source = (report.get("model") or {}).get("source")
    lines = ["## Base model", "", f"`{source}`" + (f", family {report['model']['family']}"
                                                  if (report.get("model") or {}).get("family") else "") + "."]
    if base_metadata.get("license"):
        lines.append(f"License: {base_metadata['license']} (from the base model's card; this model inherits it).")
    else:
        lines.append("The base model's card gives no license metadata; check its terms before you publish this.")
    versions = report.get("versions") or {}
    lines += ["", "Made with moecompress " + __version__ + (
        " (" + ", ".join(f"{name} {version}" for name, version in versions.items() if name != "moecompress") + ")"
        if versions else "") + "."]
    return lines + [""]


def render_model_card(report: dict[str, Any], folder: Path, *, source_folder: Path | None = None,
                      export_report: dict[str, Any] | None = None, load_path: Path | None = None) -> str:
    """The card's text for ``folder`` (a compress output, or an export when ``export_report`` is given).
    ``source_folder``: the base model's folder (its card); ``load_path``: the folder's final place, when not yet
    there."""
    base_metadata, base_heading = source_card(source_folder)
    metadata = card_metadata(report, base_metadata)
    if export_report is not None:  # the library that loads this export (a --for vllm folder: vLLM, not transformers)
        loaders = export_report.get("load") or {}
        if export_report.get("format") == "gguf":
            metadata["library_name"] = "gguf"
        elif "transformers" not in loaders and "vllm" in loaders:
            metadata["library_name"] = "vllm"
    body = [_title(report, base_heading), ""]
    body += _summary(report)
    body += _quality_section(report, measured_on_native=export_report is not None)
    body += _size_section(report, folder, export_report)
    body += _stages_section(report)
    body += _load_section(folder, export_report, load_path)
    body += _plots_section(report, folder) if export_report is None else []
    body += _recipe_section(report)
    body += _base_section(report, base_metadata)
    header = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip()
    return f"---\n{header}\n---\n\n" + "\n".join(body).rstrip() + "\n"


def write_model_card(report: dict[str, Any], folder: str | Path, *, source_folder: str | Path | None = None,
                     export_report: dict[str, Any] | None = None, load_path: str | Path | None = None) -> Path:
    """Write ``folder/README.md`` (see :func:`render_model_card`); return its path."""
    folder = Path(folder)
    text = render_model_card(report, folder, source_folder=Path(source_folder) if source_folder else None,
                             export_report=export_report, load_path=Path(load_path) if load_path else None)
    path = folder / CARD_FILE
    path.write_text(text, encoding="utf-8")
    return path
