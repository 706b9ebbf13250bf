"""The GPU check (``scripts/gpu_check.sh``): everything this project needs a GPU to measure, in one run, one JSON.

Steps, each with its own time limit, each recorded even when it fails:

1. ``environment``: torch, triton, transformers versions, the card, the packages the other steps need;
2. ``kernel_tests``: the Triton kernel tests on the GPU (``TRITON_INTERPRET`` unset: the compiled kernels);
3. ``kernel_speed``: ``benchmarks/kernel_speed.py`` (packed kernels against fp16 ``F.linear``, torch's int4
   weight-only matmul and fp16 MoE backends; 2 and 4 bits, batches 1 and 16);
4. ``gptq_cuda_vs_cpu``: a streamed GPTQ compress of each test-bed model (the bundled demo model when the test bed
   is absent) with ``--device cuda`` and with ``--device cpu``; how far the two results are apart (codes that
   differ, scales, the logits of the two models on the same tokens) and the time of each;
5. ``decode_speed``: greedy decoding, batch 1, of a packed model (step 4's GPU result, the Triton experts backend)
   against the original in bf16, tokens per second.

``--dry`` runs every step on the CPU up to its first CUDA call (argument parsing, recipes, the CPU compress, the
comparison code on CPU results, model loading and a 1-token decode on the CPU) and records ``"dry": true``: the
suite runs it (``tests/test_devices.py``), so the first GPU run finds only GPU problems. Budget: under 8 minutes on
one H100, so it can run twice in 15 minutes of GPU time.

    bash scripts/gpu_check.sh --out gpu_check_out      # writes gpu_check_out/gpu_check.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_kernels_backend.py", "tests/test_camera_kernels.py",
                "tests/test_models_packed_view.py"]
KERNEL_SPEED_ARGS = ["--bits", "2,4", "--batches", "1,16", "--moe-batches", "1,64", "--iters", "30"]
NEEDED_MODULES = ("torch", "triton", "transformers", "safetensors", "accelerate", "pydantic", "yaml", "rich",
                  "lm_eval", "compressed_tensors", "pytest")
# step -> seconds one of its commands may take on the GPU; the whole check stops starting steps after DEADLINE
LIMITS = {"kernel_tests": 120, "kernel_speed": 100, "gptq_cuda_vs_cpu": 90, "decode_speed": 60}
DEADLINE = 440  # seconds; scripts/gpu_check.sh kills the check at 470 (8 minutes with the start-up)


def testbed_models(testbed: Path | None, names: list[str] | None = None) -> list[Path]:
    """The test-bed models (those in ``names``, default all), or the bundled demo model when the test bed is not
    there (a lent machine)."""
    if testbed is not None and (testbed / "models").is_dir():
        found = sorted(path for path in (testbed / "models").iterdir() if (path / "config.json").is_file())
        return [path for path in found if names is None or path.name in names]
    return [REPO_ROOT / "demo" / "models" / "moe-ref-q3"]


def calibration_files(testbed: Path | None) -> Path:
    return testbed / "calib" if testbed is not None and (testbed / "calib").is_dir() else REPO_ROOT / "demo" / "calib"


class DryStop(Exception):
    """Raised where a step would make its first CUDA call in a dry run."""


class Check:
    def __init__(self, out: Path, dry: bool, testbed: Path | None, samples: int, seq_len: int,
                 models: list[str] | None = None, threads: int | None = None) -> None:
        self.out, self.dry, self.testbed = out, dry, testbed
        self.samples, self.seq_len = samples, seq_len
        self.models = testbed_models(testbed, models)
        self.threads = threads
        self.result: dict = {"dry": dry, "steps": {}}
        self.started = time.perf_counter()

    def cuda(self, what: str) -> None:
        """The point where a step first needs the GPU: a dry run stops here."""
        if self.dry:
            raise DryStop(what)

    def run(self, name: str, step) -> None:
        """``step(record)`` fills ``record`` as it goes, so a dry stop or a failure keeps what it found so far."""
        started = time.perf_counter()
        record: dict = {}
        if started - self.started > DEADLINE:
            record["status"] = "skipped: out of time"
            self.result["steps"][name] = record
            self.save()
            return
        try:
            step(record)
            record["status"] = "ok"
        except DryStop as stop:
            record["status"] = "dry"
            record["stopped_before"] = str(stop)
        except Exception as error:  # a failed step is a result too: record it, run the next one
            record["status"] = "failed"
            record["error"] = f"{type(error).__name__}: {error}"
            record["traceback"] = traceback.format_exc()[-2000:]
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.result["steps"][name] = record
        self.save()  # after every step: a check stopped by its time limit keeps what it measured
        print(f"[gpu_check] {name}: {record['status']} ({record['seconds']} s)", file=sys.stderr)

    def save(self) -> None:
        self.result["seconds"] = round(time.perf_counter() - self.started, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=1, default=str))

    # ----- 1 -------------------------------------------------------------------------------------------------------
    def environment(self, record: dict) -> None:
        record.update({"python": platform.python_version(), "missing_modules": []})
        for name in NEEDED_MODULES:
            try:
                module = importlib.import_module(name)
                record[name] = getattr(module, "__version__", "?")
            except Exception as error:
                record["missing_modules"].append(f"{name} ({type(error).__name__})")
        self.result["environment"] = record
        import torch

        record["torch_cuda_build"] = torch.version.cuda
        self.cuda("torch.cuda.get_device_name")
        record["device"] = torch.cuda.get_device_name()
        record["device_count"] = torch.cuda.device_count()
        record["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        self.result["device"] = record["device"]

    # ----- 2 -------------------------------------------------------------------------------------------------------
    def kernel_tests(self, record: dict) -> None:
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS]
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        record["command"] = " ".join(command[1:])
        self.cuda("the kernel tests (compiled Triton kernels)")
        finished = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                  timeout=LIMITS["kernel_tests"])
        lines = finished.stdout.strip().splitlines()
        record.update({"returncode": finished.returncode, "summary": lines[-1] if lines else "",
                       "output_tail": finished.stdout[-1500:] if finished.returncode else ""})
        if finished.returncode:
            raise RuntimeError(f"kernel tests failed on the GPU: {record['summary']}")

    # ----- 3 -------------------------------------------------------------------------------------------------------
    def kernel_speed(self, record: dict) -> None:
        sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
        import kernel_speed

        folder = self.out / "kernel_speed"
        arguments = [*KERNEL_SPEED_ARGS, "--out", str(folder)]
        kernel_speed.parse_args(arguments)  # a bad argument fails here, in a dry run too
        record["command"] = "benchmarks/kernel_speed.py " + " ".join(arguments)
        self.cuda("benchmarks/kernel_speed.py")
        finished = subprocess.run([sys.executable, "benchmarks/kernel_speed.py", *arguments], cwd=REPO_ROOT,
                                  capture_output=True, text=True, timeout=LIMITS["kernel_speed"])
        record["returncode"] = finished.returncode
        results = folder / "results.json"
        if results.is_file():
            record["rows"] = json.loads(results.read_text())["rows"]
        else:
            record["output_tail"] = (finished.stdout + finished.stderr)[-1500:]
            raise RuntimeError("benchmarks/kernel_speed.py wrote no results")

    # ----- 4 -------------------------------------------------------------------------------------------------------
    def recipe(self) -> Path:
        path = self.out / "gptq_recipe.json"
        path.write_text(json.dumps({
            "calibration": {"files": [str(calibration_files(self.testbed))], "num_samples": self.samples,
                            "seq_len": self.seq_len, "batch_size": 4},
            "stages": [{"method": "gptq", "bits": 4, "group_size": 128}]}))
        return path

    def compress(self, model: Path, device: str) -> dict:
        out = self.out / "gptq" / f"{model.name}-{device}"
        command = [sys.executable, "-m", "moecompress", "compress", str(model), "--recipe", str(self.recipe()),
                   "--out", str(out), "--device", device, "--overwrite"]
        if self.threads:
            command += ["--threads", str(self.threads)]
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=LIMITS["gptq_cuda_vs_cpu"])
        if finished.returncode != 0:
            raise RuntimeError(f"compress --device {device} of {model.name} failed: {finished.stderr[-800:]}")
        return {"folder": out, "seconds": round(time.perf_counter() - started, 2),
                "timings": json.loads((out / "report.json").read_text())["timings"]}

    def gptq_cuda_vs_cpu(self, record: dict) -> None:
        record["models"] = {}
        for model in self.models:
            cpu = self.compress(model, "cpu")
            entry = record["models"][model.name] = {"cpu_seconds": cpu["seconds"], "cpu_timings": cpu["timings"]}
            if self.dry:  # the comparison code on the CPU result against itself: every difference must be zero
                entry["dry_self_comparison"] = compare_outputs(cpu["folder"], cpu["folder"])
                continue
            self.cuda("compress --device cuda")
            gpu = self.compress(model, "cuda")
            entry.update({"cuda_seconds": gpu["seconds"], "cuda_timings": gpu["timings"],
                          **compare_outputs(cpu["folder"], gpu["folder"])})
        self.cuda("compress --device cuda")

    # ----- 5 -------------------------------------------------------------------------------------------------------
    def decode_speed(self, record: dict) -> None:
        import torch

        model = self.models[0]
        packed_folder = self.out / "gptq" / f"{model.name}-{'cpu' if self.dry else 'cuda'}"
        if not (packed_folder / "config.json").is_file():
            raise RuntimeError(f"step gptq_cuda_vs_cpu wrote no {packed_folder}; nothing packed to decode")
        device = "cpu" if self.dry else "cuda"
        record.update({"model": model.name, "new_tokens": 1 if self.dry else 128})
        for name, folder in (("bf16", model), ("packed", packed_folder)):
            record[name] = decode_tokens_per_second(folder, device, record["new_tokens"], torch.bfloat16)
        self.cuda("the decode on the GPU")
        record["packed_over_bf16"] = record["packed"]["tokens_per_second"] / record["bf16"]["tokens_per_second"]


def compare_outputs(first: Path, second: Path) -> dict:
    """How far two compress outputs of the same recipe are apart: packed codes that differ, the largest relative
    scale difference, and the two models' fp32 logits on the same 4 x 64 tokens (top-1 agreement, max |diff|)."""
    import torch
    from safetensors import safe_open

    from moecompress.kernels.layout import unpack_signed

    def tensors(folder: Path) -> dict:
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                found.update({key: handle.get_tensor(key) for key in handle.keys()})
        return found

    a, b = tensors(first), tensors(second)
    codes_total = codes_differ = 0
    largest_scale = 0.0
    for key in sorted(set(a) & set(b)):
        if "_packed_w" in key:
            bits = int(key.rsplit("_w", 1)[1])
            columns = a[key].shape[-1] * 32 // bits
            codes_a, codes_b = unpack_signed(a[key], bits, columns), unpack_signed(b[key], bits, columns)
            codes_total += codes_a.numel()
            codes_differ += int((codes_a != codes_b).sum())
        elif "_scale_w" in key:
            relative = (a[key].float() - b[key].float()).abs() / b[key].float().abs().clamp_min(1e-12)
            largest_scale = max(largest_scale, float(relative.max()))
    logits = {}
    import moecompress  # noqa: F401  (the native format)
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(3, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    for name, folder in (("first", first), ("second", second)):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(tokens).logits
    return {"codes_compared": codes_total, "codes_differ": codes_differ,
            "codes_differ_fraction": codes_differ / max(codes_total, 1), "max_relative_scale_diff": largest_scale,
            "logits_top1_agreement": float((logits["first"].argmax(-1) == logits["second"].argmax(-1)).float().mean()),
            "logits_max_abs_diff": float((logits["first"] - logits["second"]).abs().max())}


def decode_tokens_per_second(folder: Path, device: str, new_tokens: int, dtype) -> dict:
    """Greedy decoding of ``new_tokens`` after a 16-token prompt, batch 1 (one warm-up run first)."""
    import torch
    from transformers import AutoModelForCausalLM

    import moecompress  # noqa: F401  (the native format; packed experts use the moecompress_packed backend)

    from moecompress.kernels.backend import BACKEND_NAME, register_packed_experts_backend

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    if getattr(model.config, "quantization_config", None) is not None:  # packed experts: the Triton grouped kernel
        register_packed_experts_backend()
        model.set_experts_implementation(BACKEND_NAME)
    prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)

    def generate():
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    generate()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    generate()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "tokens_per_second": new_tokens / seconds,
            "experts_implementation": getattr(model.config, "_experts_implementation", None)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--dry", action="store_true", help="CPU only: every step up to its first CUDA call")
    parser.add_argument("--testbed", type=Path, default=Path(os.environ.get("MOECOMPRESS_TESTBED",
                                                                             REPO_ROOT.parent / "shared" / "testbed")))
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences (default 16; dry 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256; dry 32)")
    parser.add_argument("--steps", default="environment,kernel_tests,kernel_speed,gptq_cuda_vs_cpu,decode_speed")
    parser.add_argument("--models", default=None, help="test-bed models to compress, comma separated (default all)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the compress runs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    samples = args.samples or (4 if args.dry else 16)
    seq_len = args.seq_len or (16 if args.dry else 256)
    check = Check(args.out, args.dry, args.testbed if args.testbed.is_dir() else None, samples, seq_len,
                  args.models.split(",") if args.models else None, args.threads)
    for name in args.steps.split(","):
        check.run(name, getattr(check, name))
    check.save()
    print(f"[gpu_check] wrote {args.out / 'gpu_check.json'} ({check.result['seconds']} s)", file=sys.stderr)
    failed = [name for name, step in check.result["steps"].items() if step["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
