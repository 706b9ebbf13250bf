"""Export a native moecompress folder as a plain Hugging Face checkpoint that loads with no extra package.

For models whose structure plain transformers can describe: uniformly pruned or merged (``collapse``) models, every
MoE layer with the same expert count. Streamed like the compressed-tensors export (one layer at a time).

* unquantized input: the tensors are copied (saved per-expert names already are transformers' checkpoint layout);
* quantized input is refused unless ``dequantize=True``: then each packed expert / linear is written as our
  dequantised weight at its scales' dtype (the checkpoint dtype), so the folder is full size again. It is the weights
  our packed model computes with, rounded once to that dtype (plain transformers loads exactly those).

Refused (one line, with the fixing recipe option): different expert counts per layer, variable-width experts.
"""

from __future__ import annotations

import json
from pathlib import Path

from moecompress.checkpoint.native_reader import NativeCheckpoint, expert_projection_names, is_packed_experts_key
from moecompress.checkpoint.shards import ShardWriter
from moecompress.errors import UsageError
from moecompress.export.deployability import NotDeployableError, expert_count_problem, variable_width_problem
from moecompress.export.output import check_output_folder, staged_output
from moecompress.export.report import ExportTally, write_report

FORMAT = "hf"


def export_hf(source: str | Path, out: str | Path, *, dequantize: bool = False, max_shard_bytes: int = 2 << 30,
              replace_own: bool = False) -> dict:
    """Write ``out`` (new or empty; ``replace_own``: or an earlier export of ``source``) as a plain HF checkpoint of
    the native folder ``source``; returns the report."""
    checkpoint = NativeCheckpoint(source)
    out = Path(out)
    check_output_folder(checkpoint.folder, out, replace_own=replace_own)
    for problem in (variable_width_problem(checkpoint), expert_count_problem(checkpoint)):
        if problem:
            raise NotDeployableError(f"cannot export {checkpoint.folder} as a plain HF checkpoint: {problem.message()}")
    if checkpoint.is_quantized and not dequantize:
        raise UsageError(f"{checkpoint.folder} holds quantized weights, which a plain HF checkpoint cannot store; export "
                         "with --format compressed-tensors, or add --dequantize (full-size weights)")
    gate_name, up_name, down_name = expert_projection_names(checkpoint.model_type)
    layers = {layer.prefix: layer for layer in checkpoint.expert_layers}
    linears = {spec.path: spec for spec in checkpoint.packed_linears}
    tally = ExportTally()
    with staged_output(out, replace_own=replace_own) as partial:
        writer = ShardWriter(partial, max_shard_bytes)
        done_layers = set()
        for key in checkpoint.keys():
            module, _, name = key.rpartition(".")
            if is_packed_experts_key(key):
                if module in done_layers:
                    continue
                done_layers.add(module)
                layer = layers[module]
                for expert in range(len(layer.expert_bits)):
                    gate_up = checkpoint.expert_weight(layer, expert, "gate_up_proj").dequantize()
                    down = checkpoint.expert_weight(layer, expert, "down_proj").dequantize()
                    middle = gate_up.shape[0] // 2
                    for projection, weight in ((gate_name, gate_up[:middle]), (up_name, gate_up[middle:]),
                                               (down_name, down)):
                        writer.add(f"{module}.{expert}.{projection}.weight", weight)
                        tally.add_plain(weight, expert=True)
            elif module in linears and name in ("weight_packed", "weight_scale", "weight_zero_point"):
                if name == "weight_packed":
                    weight = checkpoint.linear_weight(linears[module]).dequantize()
                    writer.add(f"{module}.weight", weight)
                    tally.add_plain(weight)
            else:
                tensor = checkpoint.tensor(key)
                writer.add(key, tensor)
                tally.add_plain(tensor, expert=".experts." in key)
        writer.finish()
        config = {key: value for key, value in checkpoint.config.items() if key != "quantization_config"}
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        checkpoint.copy_side_files(partial)
        notes = ["dequantized: full-precision weights equal to what the packed model computes with"] if dequantize and \
            checkpoint.is_quantized else []
        report = write_report(partial, FORMAT, checkpoint, out, tally, notes=notes)
    checkpoint.close()
    return report
