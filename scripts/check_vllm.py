"""vLLM's own loader on every compressed-tensors export shape moecompress says vLLM serves.

Three steps (``scripts/check_vllm.sh`` runs them all and sets up the vLLM venv):

``python scripts/check_vllm.py build WORK``  (the project's Python, with moecompress)
    Quantizes the test-bed models (RTN) into native folders, exports every shape whose "load with" lines name
    vLLM (uniform, per-layer widths ``--for vllm``, ``--widen-to-model-max``, asymmetric ``--for vllm``, 8-bit,
    DeepSeek with quantized shared experts and attention, the demo's shape), and writes ``WORK/manifest.json`` with
    our native model's greedy tokens for a few prompts (token ids), the reference for generation.

``VENV/bin/python scripts/check_vllm.py check WORK``  (the vLLM venv; never imports moecompress)
    Runs :func:`probe` on each export in a fresh process and prints one table row per export, then the first stage
    this machine could not reach. Stages, in order:

    1. ``ct parse``: the venv's compressed-tensors (vLLM 0.32 pins 0.17) validates the ``quantization_config``;
    2. ``vLLM config``: ``CompressedTensorsConfig.from_config`` (vLLM's parser);
    3. ``schemes``: vLLM builds the model (``LLM(...)``, in-process) and ``get_quant_method`` picks a method for every
       layer: each MoE layer must get ``CompressedTensorsWNA16MoEMethod``, each quantized linear the WNA16 scheme,
       every other linear ``UnquantizedLinearMethod`` (recorded per layer, none may raise);
    4. ``MoE backend``: the WNA16 MoE kernel vLLM selects for this machine. A CPU without AMX (and no GPU) has none
       ("No WNA16 MoE backend supports the deployment configuration"); the probe then records that and lets model
       construction go on (``--no-bypass`` stops there) so that the next stage still runs;
    5. ``weights``: vLLM's weight loader reads every tensor of the folder into the layers (a missing or unexpected
       tensor raises there). With the backend bypassed, the probe stops right after this stage;
    6. ``generate``: greedy decoding of the prompts; the tokens are compared with our native model's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS = 24
NEW_TOKENS = 16


# ----- build (project venv) ------------------------------------------------------------------------------------
def shapes() -> list[dict]:
    """Every export shape moecompress claims vLLM serves: ``name``, model, native options, export options."""
    group = {"moe-ref-q3": 16, "moe-ref-mx": 32, "moe-ref-ds": 32}
    found = []
    for model, size in group.items():
        short = model.rsplit("-", 1)[-1]
        found += [
            dict(name=f"{short} uniform 4-bit", model=model, native=dict(bits=4, group_size=size), export={}),
            dict(name=f"{short} per-layer 2/3/4-bit --for vllm", model=model,
                 native=dict(group_size=size, widths="layer"), export=dict(consumer="vllm")),
            dict(name=f"{short} per-layer 2/3/4-bit --widen-to-model-max", model=model,
                 native=dict(group_size=size, widths="layer"), export=dict(widen_to_model_max=True)),
        ]
    found += [
        dict(name="mx uniform 8-bit", model="moe-ref-mx", native=dict(bits=8, group_size=32), export={}),
        dict(name="mx 2/4-bit in each layer --widen-to-layer-max", model="moe-ref-mx",
             native=dict(group_size=32, widths="expert"), export=dict(widen_to_layer_max=True)),
        dict(name="mx asymmetric 4-bit --for vllm", model="moe-ref-mx", native=dict(bits=4, group_size=32,
                                                                                    symmetric=False),
             export=dict(consumer="vllm")),
        dict(name="ds 4-bit routed + shared experts + attention", model="moe-ref-ds",
             native=dict(bits=4, group_size=32, targets=["routed_experts", "shared_experts", "attention"]), export={}),
        dict(name="q3 demo shape (24 experts, 4/3/2-bit per layer) --for vllm", model="moe-ref-q3",
             native=dict(group_size=16, widths="demo", keep=24), export=dict(consumer="vllm")),
    ]
    return found


def build(work: Path, testbed: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moecompress  # noqa: F401  (registers the native format: our model is the reference)

    torch.set_num_threads(1)  # the test-bed models are tiny: one thread is fastest, more only contend
    widths = {"layer": lambda layer, expert: (2, 3, 4)[layer % 3], "expert": lambda layer, expert: (2, 4)[expert % 2],
              "demo": lambda layer, expert: (4, 3, 2, 4, 3, 2)[layer]}
    work.mkdir(parents=True, exist_ok=True)
    manifest = []
    for number, shape in enumerate(shapes()):
        if not (testbed / "models" / shape["model"]).is_dir():
            print(f"skipped {shape['name']}: no {shape['model']} under {testbed / 'models'}", flush=True)
            continue
        native, out = work / f"native-{number}", work / f"export-{number}"
        if (out / "export_report.json").is_file():  # built by an earlier, interrupted build
            report = json.loads((out / "export_report.json").read_text())
        else:
            report = _native_and_export(testbed, shape, widths, native, out)
        assert "vllm" in report["load"], f"{shape['name']}: the export does not claim vLLM"
        reference = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32)  # our native model
        prompts = _prompts(testbed, AutoTokenizer.from_pretrained(native))
        greedy = []
        with torch.no_grad():
            for prompt in prompts:
                output = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
                greedy.append(output[0, len(prompt):].tolist())
        manifest.append({"name": shape["name"], "folder": str(out), "native": str(native), "prompts": prompts,
                         "native_greedy": greedy, "load": report["load"]})
        print(f"built {shape['name']}: {out}", flush=True)
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _native_and_export(testbed: Path, shape: dict, widths: dict, native: Path, out: Path) -> dict:
    """Quantize (RTN, minmax scales) the shape's test-bed model into ``native``, export it into ``out``."""
    import torch

    from moecompress.checkpoint import load_model, save_model
    from moecompress.export import export_folder
    from moecompress.models import find_moe_blocks, keep_experts
    from moecompress.quantization.sequential import QuantizationSettings, quantize_model

    options = dict(shape["native"])
    model, tokenizer = load_model(testbed / "models" / shape["model"], dtype=torch.bfloat16)
    if "keep" in options:
        keep = options.pop("keep")
        keep_experts(model, {view.layer_index: list(range(keep)) for view in find_moe_blocks(model)})
    bit_map = None
    if "widths" in options:
        chosen = widths[options.pop("widths")]
        bit_map = {(view.layer_index, expert): chosen(view.layer_index, expert)
                   for view in find_moe_blocks(model) for expert in range(view.num_experts)}
    quantize_model(model, QuantizationSettings(method="rtn", bits=options.get("bits", 4),
                                               group_size=options["group_size"], scale_search="minmax",
                                               symmetric=options.get("symmetric", True), bit_map=bit_map,
                                               targets=tuple(options.get("targets", ["routed_experts"]))))
    if native.exists():
        shutil.rmtree(native)
    native.mkdir()
    save_model(model, tokenizer, native)
    (native / "report.json").write_text("{}\n")
    if out.exists():
        shutil.rmtree(out)
    return export_folder(native, out, "compressed-tensors", **shape["export"])


def _prompts(testbed: Path, tokenizer) -> list[list[int]]:
    """Token ids of the first lines of three calibration domains (prose, code, dictionary)."""
    prompts = []
    for domain in ("austen", "pycode", "wordnet"):
        text = json.loads((testbed / "calib" / f"{domain}.jsonl").read_text().splitlines()[0])["text"]
        prompts.append(tokenizer(text)["input_ids"][:PROMPT_TOKENS])
    return prompts


# ----- probe (vLLM venv, one export per process) -------------------------------------------------------------------
class StopAfterLoading(Exception):
    """Raised once the weights are loaded when no MoE kernel backend exists here (nothing further can run)."""


def probe(folder: str, prompts: list[list[int]], bypass: bool) -> dict:
    """Run the stages of the module docstring on one export; returns ``{"stages": {name: text}, "layers": [...],
    "greedy": [[ids]] or None}``. Never raises: a stage's error is its result."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: the hooks see it
    stages: dict[str, str] = {}
    layers: list[dict] = []
    result = {"stages": stages, "layers": layers, "greedy": None}
    config = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    try:
        from compressed_tensors.quantization import QuantizationConfig

        QuantizationConfig.model_validate(copy.deepcopy(config))
        stages["ct parse"] = "ok"
    except Exception as error:  # the stage's result, not a crash of the probe
        stages["ct parse"] = _error(error)
        return result
    from vllm import LLM, SamplingParams
    from vllm.model_executor.layers.quantization.compressed_tensors import compressed_tensors as ct_module
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_wna16 as wna16_module,
    )

    try:
        ct_module.CompressedTensorsConfig.from_config(copy.deepcopy(config))
        stages["vLLM config"] = "ok"
    except Exception as error:
        stages["vLLM config"] = _error(error)
        return result

    backend = {"error": None, "chosen": set()}
    original_get_quant_method = ct_module.CompressedTensorsConfig.get_quant_method
    original_select = wna16_module.select_wna16_moe_backend
    original_process = wna16_module.CompressedTensorsWNA16MoEMethod.process_weights_after_loading

    def get_quant_method(self, layer, prefix):
        entry = {"prefix": prefix, "layer": type(layer).__name__}
        layers.append(entry)
        try:
            method = original_get_quant_method(self, layer, prefix)
        except Exception as error:
            entry["error"] = _error(error)
            raise
        entry["method"] = type(method).__name__ if method is not None else "unquantized"
        scheme = getattr(layer, "scheme", None)
        if scheme is not None:
            entry["scheme"] = type(scheme).__name__
        if getattr(method, "num_bits", None) is not None:  # the WNA16 MoE method: the scheme it read for the layer
            entry["bits"] = int(method.num_bits)
        return method

    def select(*args, **kwargs):
        try:
            chosen = original_select(*args, **kwargs)
        except NotImplementedError as error:
            backend["error"] = _error(error)
            if not bypass:
                raise
            # no kernel here: go on building the model with vLLM's emulation experts class so that scheme matching
            # and weight loading of every layer still run; nothing is computed with it (see StopAfterLoading)
            from vllm.model_executor.layers.fused_moe.experts.int4_emulation_moe import Int4EmulationTritonExperts

            return wna16_module.WNA16MoEBackend.EMULATION, Int4EmulationTritonExperts
        backend["chosen"].add(chosen[0].value)
        return chosen

    def process_weights_after_loading(self, layer):
        if backend["error"] is not None:
            raise StopAfterLoading("weights loaded; no MoE kernel backend on this machine")
        return original_process(self, layer)

    ct_module.CompressedTensorsConfig.get_quant_method = get_quant_method
    wna16_module.select_wna16_moe_backend = select
    wna16_module.CompressedTensorsWNA16MoEMethod.process_weights_after_loading = process_weights_after_loading
    llm = None
    try:
        llm = LLM(model=folder, dtype="bfloat16", enforce_eager=True, max_model_len=128, seed=0,
                  gpu_memory_utilization=float(os.environ.get("CHECK_VLLM_MEMORY_FRACTION", "0.05")))
    except StopAfterLoading:
        stages["weights"] = "ok (all tensors loaded)"
    except Exception as error:
        stages["weights" if backend["error"] else "engine"] = _error(error)
    stages["schemes"] = _schemes_summary(layers)
    stages["MoE backend"] = (f"none here: {backend['error']}" if backend["error"] else
                             ", ".join(sorted(backend["chosen"])) or "-")
    if llm is not None:
        stages["weights"] = "ok"
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
        outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in prompts], params)
        result["greedy"] = [list(output.outputs[0].token_ids) for output in outputs]
        stages["generate"] = "ok"
    return result


def _schemes_summary(layers: list[dict]) -> str:
    """``RoutedExperts -> CompressedTensorsWNA16MoEMethod (2/3/4-bit) x6; QKVParallelLinear -> UnquantizedLinearMethod
    x6``, and the layers whose method raised."""
    counts: dict[str, int] = {}
    bits: dict[str, set] = {}
    for entry in layers:
        if entry["layer"] == "Attention":
            continue  # the KV-cache method every attention layer gets
        method = entry.get("method") or "raised: " + entry.get("error", "")
        key = f"{entry['layer']} -> {method}" + (f" [{entry['scheme']}]" if entry.get("scheme") else "")
        counts[key] = counts.get(key, 0) + 1
        if "bits" in entry:
            bits.setdefault(key, set()).add(entry["bits"])
    return "; ".join(key + (f" ({'/'.join(map(str, sorted(bits[key])))}-bit)" if key in bits else "") + f" x{count}"
                     for key, count in counts.items())


def _error(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}"


def _accepted(stages: dict[str, str]) -> bool:
    """What every export we claim must show wherever vLLM runs: both parsers accept the config, every MoE layer gets
    the WNA16 MoE method and no layer's method raises, and the weights load when the model could be built."""
    schemes = stages.get("schemes", "")
    return (stages.get("ct parse") == "ok" and stages.get("vLLM config") == "ok"
            and "RoutedExperts -> CompressedTensorsWNA16MoEMethod" in schemes and "raised" not in schemes
            and "RoutedExperts -> unquantized" not in schemes
            and stages.get("weights", "ok").startswith("ok") and "engine" not in stages)


# ----- check (vLLM venv) -------------------------------------------------------------------------------------------
STAGES = ("ct parse", "vLLM config", "schemes", "MoE backend", "weights", "generate")


def check(work: Path, names: list[str], bypass: bool) -> int:
    import compressed_tensors
    import torch
    import transformers
    import vllm

    assert "moecompress" not in sys.modules
    manifest = json.loads((work / "manifest.json").read_text())
    if names:
        manifest = [entry for entry in manifest if entry["name"] in names]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    amx = "amx_tile" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    print(f"vLLM {vllm.__version__}, compressed-tensors {compressed_tensors.__version__}, transformers "
          f"{transformers.__version__}, torch {torch.__version__}; device {device}"
          + ("" if device == "cuda" else f" (AMX: {'yes' if amx else 'no'})"))
    print()
    print("| export | " + " | ".join(STAGES) + " | greedy tokens = native |")
    print("|---|" + "---|" * (len(STAGES) + 1))
    unreached, failed = {}, False
    for entry in manifest:
        started = time.perf_counter()
        out = work / f"probe-{manifest.index(entry)}.json"
        command = [sys.executable, __file__, "probe", entry["folder"], str(out)] + ([] if bypass else ["--no-bypass"])
        run = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                             input=json.dumps(entry["prompts"]))
        if run.returncode != 0 or not out.is_file():
            print(f"| {entry['name']} | probe crashed: {run.stderr.strip().splitlines()[-1:]} |")
            failed = True
            continue
        result = json.loads(out.read_text())
        cells = [result["stages"].get(stage, "not reached") for stage in STAGES]
        agreement = "-"
        if result["greedy"] is not None:
            pairs = [(a, b) for ours, theirs in zip(entry["native_greedy"], result["greedy"]) for a, b in zip(ours, theirs)]
            agreement = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
        print(f"| {entry['name']} | " + " | ".join(cell.replace("|", "/") for cell in cells) + f" | {agreement} |",
              flush=True)
        for stage, cell in zip(STAGES, cells):
            if cell == "not reached" or cell.startswith("none here"):
                unreached.setdefault(stage, []).append(entry["name"])
                break
        if not _accepted(result["stages"]):
            failed = True
        print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    print()
    for stage, exports in unreached.items():
        print(f"first stage not reached here: {stage} ({len(exports)} of {len(manifest)} exports)")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    build_parser = sub.add_parser("build")
    build_parser.add_argument("work", type=Path)
    build_parser.add_argument("--testbed", type=Path, default=Path(__file__).resolve().parents[1] / "demo",
                              help="a folder with models/ and calib/ (default: the bundled demo, moe-ref-q3 only)")
    check_parser = sub.add_parser("check")
    check_parser.add_argument("work", type=Path)
    check_parser.add_argument("names", nargs="*")
    check_parser.add_argument("--no-bypass", action="store_true", help="stop at the MoE backend stage")
    probe_parser = sub.add_parser("probe")
    probe_parser.add_argument("folder")
    probe_parser.add_argument("out", type=Path)
    probe_parser.add_argument("--no-bypass", action="store_true")
    args = parser.parse_args()
    if args.step == "build":
        build(args.work, args.testbed)
        return 0
    if args.step == "check":
        return check(args.work, args.names, not args.no_bypass)
    prompts = json.loads(sys.stdin.read())
    args.out.write_text(json.dumps(probe(args.folder, prompts, not args.no_bypass)))
    return 0


if __name__ == "__main__":  # vLLM starts worker processes that re-import this file
    sys.exit(main())
