"""``moecompress export DIR --format compressed-tensors|hf|gguf --out DIR2``: a native output folder for other tools."""

from __future__ import annotations

import argparse
from pathlib import Path

from moecompress.commands.arguments import positive_int
from moecompress.export import EXPORT_FORMATS, export_folder
from moecompress.export.report import render_report


def add_export_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``export`` and ``compress --export``."""
    parser.add_argument("--tp", type=positive_int, default=1,
                        help="compressed-tensors: tensor-parallel size the folder must serve at; group sizes must "
                             "divide each rank's slice (default 1)")
    parser.add_argument("--widen-to-layer-max", action="store_true",
                        help="compressed-tensors: store every expert of a layer at the layer's widest width (lossless, "
                             "larger) so a layer with mixed widths has one scheme")
    parser.add_argument("--widen-to-model-max", action="store_true",
                        help="compressed-tensors: store every MoE layer's experts at the model's widest width "
                             "(lossless, larger) so the folder has one experts scheme, which plain transformers loads")
    parser.add_argument("--for", dest="consumer", choices=["vllm"], default=None,
                        help="compressed-tensors: write a folder for this consumer only (per-layer widths, asymmetric "
                             "experts); plain transformers then refuses it (default: it must load everywhere)")
    parser.add_argument("--dequantize", action="store_true",
                        help="hf: write quantized weights dequantized (full size) instead of refusing")
    parser.add_argument("--types", default=None, metavar="ROLE[.PROJ][@LAYERS]=TYPE,...",
                        help="gguf: GGML types by role (embedding, output, attention, shared_expert, dense_ffn, "
                             "routed_experts, router), e.g. 'attention=Q6_K,routed_experts.down@0-1=Q4_K'; default "
                             "auto: the width each tensor has (exact Q8_0/Q4_0 where the formats agree, else the "
                             "K-quant of that width); float weights keep their dtype in an unquantized model and "
                             "become Q8_0 in a quantized one; routers F32")
    parser.add_argument("--layer-mean", action="store_true",
                        help="gguf: store a layer whose experts have different widths at their mean width instead "
                             "of the widest")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a compressed model for vLLM / plain transformers / llama.cpp",
        description="Convert a native moecompress output folder (the --out of `compress`) shard by shard into a "
                    "compressed-tensors pack-quantized checkpoint (vLLM `--quantization compressed-tensors`, "
                    "transformers with compressed-tensors installed), a plain Hugging Face checkpoint, or one GGUF "
                    "file for llama.cpp (--out FILE.gguf; also from an unquantized model folder). What the consumer "
                    "cannot load is refused before anything is written, with the recipe option that fixes it. "
                    "Writes OUT/export_report.json (size, bits per parameter, loading commands; for gguf "
                    "FILE.export_report.json beside the file, with each tensor's type and error).",
    )
    parser.add_argument("model", type=Path, help="native moecompress output folder")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="output format")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder (new or empty; never inside MODEL); for gguf the .gguf file")
    add_export_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = export_folder(args.model, args.out, args.format, tp=args.tp, widen_to_layer_max=args.widen_to_layer_max,
                           widen_to_model_max=args.widen_to_model_max, consumer=args.consumer,
                           dequantize=args.dequantize, types=args.types, layer_mean=args.layer_mean)
    print("\n".join(render_report(report)))
    return 0
