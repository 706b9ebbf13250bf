"""The export report: size on disk, bits per parameter and how each consumer loads the folder (``export_report.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moecompress.checkpoint.native_reader import NativeCheckpoint
from moecompress.evals.model_card import CARD_FILE, write_model_card
from moecompress.export.output import REPORT_FILE, folder_bytes
from moecompress.folders import read_json


@dataclass
class ExportTally:
    """Weights and bytes written, counted while streaming. A packed matrix counts ``out x in`` parameters and the
    bytes of all its tensors (codes, scales, zero points, shape); a plain tensor its values and bytes."""

    parameters: int = 0
    payload_bytes: int = 0
    expert_parameters: int = 0
    expert_bytes: int = 0
    widened_experts: int = 0

    def add_packed(self, shape: tuple[int, int], state: dict[str, torch.Tensor], *, expert: bool) -> None:
        values = int(shape[0]) * int(shape[1])
        size = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
        self.parameters += values
        self.payload_bytes += size
        if expert:
            self.expert_parameters += values
            self.expert_bytes += size

    def add_plain(self, tensor: torch.Tensor, *, expert: bool = False) -> None:
        self.parameters += tensor.numel()
        self.payload_bytes += tensor.numel() * tensor.element_size()
        if expert:
            self.expert_parameters += tensor.numel()
            self.expert_bytes += tensor.numel() * tensor.element_size()


def consumer_commands(fmt: str, out: Path, source: Path, tp: int) -> dict[str, str]:
    """The exact command each consumer loads ``out`` with (and our native loader, for ``source``)."""
    transformers_load = f"python -c \"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('{out}')\""
    commands = {"transformers": transformers_load + ("  # needs: pip install compressed-tensors"
                                                     if fmt == "compressed-tensors" else "")}
    if fmt == "compressed-tensors":
        commands["vllm"] = f"vllm serve {out} --quantization compressed-tensors" + (
            f" --tensor-parallel-size {tp}" if tp > 1 else "")
    else:
        commands["vllm"] = f"vllm serve {out}"
    commands["moecompress_native"] = (f"python -c \"import moecompress, transformers; "
                                      f"transformers.AutoModelForCausalLM.from_pretrained('{source}')\"")
    return commands


def write_report(folder: Path, fmt: str, checkpoint: NativeCheckpoint, out: Path, tally: ExportTally, *, tp: int = 1,
                 notes: list[str] | None = None, consumers: tuple[str, ...] | None = None) -> dict:
    """Write the export's model card ``folder/README.md`` and ``folder/export_report.json`` (``folder`` holds the
    finished shards and side files: the report is the last file an export writes) and return the report. ``files``
    lists every file of the export, so that a later export replacing it removes those and nothing else.
    ``consumers``: the consumers shown to load this folder (default: all); only their commands are listed."""
    on_disk = folder_bytes(folder)
    report = {
        "format": fmt,
        "source": str(checkpoint.folder.resolve()),
        "out": str(Path(out).resolve()),
        "bytes_on_disk": on_disk,
        "source_bytes_on_disk": folder_bytes(checkpoint.folder),
        "parameters": tally.parameters,
        "bits_per_parameter": 8 * tally.payload_bytes / max(tally.parameters, 1),
        "expert_parameters": tally.expert_parameters,
        "expert_bits_per_parameter": (8 * tally.expert_bytes / tally.expert_parameters) if tally.expert_parameters else None,
        "widened_experts": tally.widened_experts,
        "tensor_parallel_size": tp,
        "load": {consumer: command for consumer, command in
                 consumer_commands(fmt, Path(out).resolve(), checkpoint.folder.resolve(), tp).items()
                 if consumers is None or consumer in consumers or consumer == "moecompress_native"},
        "notes": list(notes or []),
        "files": sorted([*(str(path.relative_to(folder)) for path in folder.rglob("*")
                           if path.is_file() and not path.name.startswith(".moecompress")), CARD_FILE, REPORT_FILE]),
    }
    # the model card: the compress run's report when the source is a run's folder, and how to load this export
    run_report = read_json(checkpoint.folder / "report.json") or {"model": {"source": str(checkpoint.folder)}}
    base = Path(str((run_report.get("model") or {}).get("source") or ""))
    write_model_card(run_report, folder, export_report=report, source_folder=base if base.is_dir() else None,
                     load_path=Path(out))
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def render_report(report: dict) -> list[str]:
    """Lines for the terminal."""
    lines = [
        f"{report['format']}: {report['out']}",
        f"  on disk {report['bytes_on_disk'] / 2**20:.2f} MiB (native {report['source_bytes_on_disk'] / 2**20:.2f} MiB); "
        f"{report['bits_per_parameter']:.2f} bits/parameter over {report['parameters']:,} parameters"
        + (f"; experts {report['expert_bits_per_parameter']:.2f} bits/parameter"
           if report.get("expert_bits_per_parameter") else ""),
    ]
    if report.get("widened_experts"):
        lines.append(f"  widened {report['widened_experts']} expert(s) to their layer's widest width (lossless)")
    lines.append("  load with:")
    lines += [f"    {consumer}: {command}" for consumer, command in report["load"].items()]
    lines += [f"  note: {note}" for note in report.get("notes", [])]
    return lines
