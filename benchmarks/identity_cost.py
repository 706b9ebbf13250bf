"""What the sound run identity costs: the full-content hash of a source checkpoint, against one calibration pass.

A compress run identifies its source model by the sha256 of every byte of its safetensors files (and checks every
floating-point tensor for NaN/inf while reading them: ``moecompress.checkpoint.fingerprint.source_identity``). The
per-file hashes are kept in the run's ``state.json`` and reused while a file's size, times and inode are unchanged,
so only a run's first start pays the read. This benchmark measures, each in a fresh process, on the random bf16
Qwen3-MoE checkpoint of ``calibration_memory.py`` (2.76 GiB at the default ``--size-gb 3``):

* ``identity, cold``: the full hash + finite check with the checkpoint's pages evicted from the page cache first
  (``posix_fadvise(DONTNEED)``: what a first run on a checkpoint not read recently pays);
* ``identity, warm``: the same with the pages cached (a run started right after another read of the checkpoint);
* ``identity, cached``: a later start of the same run (the hashes come from ``state.json``: one ``stat`` per file);
* ``calibration pass, cold``: the compress run's profiling pass (lazy, layer by layer, ``PROFILE_STATISTICS``) over
  ``--num-samples x --seq-len`` tokens, also from an evicted page cache;

and prints each as seconds and as a ratio to the calibration pass. Run it on a quiet machine::

    python benchmarks/identity_cost.py                                # 2.76 GiB, 64 x 512 tokens (recipe default)
    python benchmarks/identity_cost.py --size-gb 0.1 --num-samples 4 --seq-len 32 --folder /tmp/moe-small  # check

Timings depend on the disk and on other load; the ratio is what to report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO_ROOT, add_repo_to_path, add_threads_argument, set_offline, set_threads

MODES = ("identity-cold", "identity-warm", "identity-cached", "pass-cold")
LABELS = {"identity-cold": "identity, cold", "identity-warm": "identity, warm", "identity-cached": "identity, cached",
          "pass-cold": "calibration pass, cold"}


def evict_page_cache(folder: Path) -> None:
    """Drop the safetensors files' pages from the page cache (no root needed: ``POSIX_FADV_DONTNEED`` on files
    with no dirty pages)."""
    for path in sorted(folder.glob("*.safetensors")):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def warm_page_cache(folder: Path) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb", buffering=0) as handle:
            while handle.read(64 << 20):
                pass


def child(mode: str, folder: Path, num_samples: int, seq_len: int, batch_size: int, dtype: str) -> dict:
    """One measurement in this (fresh) process; returns its JSON row."""
    set_offline()
    add_repo_to_path()
    import torch

    from moecompress.checkpoint.fingerprint import source_identity
    from moecompress.checkpoint.validation import validate_checkpoint

    validate_checkpoint(folder)  # what a run does before; not timed (headers only)
    if mode.startswith("identity"):
        cached = source_identity(folder, threads=1).files if mode == "identity-cached" else None
        if mode == "identity-cold":
            evict_page_cache(folder)
        elif mode == "identity-warm":
            warm_page_cache(folder)
        started = time.perf_counter()
        identity = source_identity(folder, cached)
        seconds = time.perf_counter() - started
        return {"mode": mode, "seconds": seconds, "files_read": len(identity.hashed)}
    from moecompress.calibration import LayerwiseRunner
    from moecompress.pipeline import PROFILE_STATISTICS

    torch.manual_seed(0)
    input_ids = torch.randint(1, 8192, (num_samples, seq_len))
    input_ids[:, 0] = 0
    evict_page_cache(folder)
    started = time.perf_counter()
    runner = LayerwiseRunner.from_source(folder, dtype=None if dtype == "auto" else getattr(torch, dtype))
    runner.run(input_ids, list(PROFILE_STATISTICS), batch_size=batch_size)
    return {"mode": mode, "seconds": time.perf_counter() - started, "tokens": num_samples * seq_len}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/moecompress-bench-3gb"),
                        help="checkpoint folder (written once by calibration_memory.write_checkpoint when missing)")
    parser.add_argument("--size-gb", type=float, default=3.0, help="size of the checkpoint to write (3.0: 2.76 GiB)")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration sequences (recipe default 64)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (recipe default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size (recipe default 8)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="compute dtype of the pass (auto: the checkpoint's, as compress does)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement (the minimum is reported)")
    parser.add_argument("--json-out", type=Path, default=None)
    add_threads_argument(parser, None, help="CPU threads of torch in the pass (default: torch's choice)")
    parser.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        set_threads(args.threads)
        print(json.dumps(child(args.child, args.folder, args.num_samples, args.seq_len, args.batch_size, args.dtype)))
        return

    if not (args.folder / "model.safetensors.index.json").is_file():
        sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
        from calibration_memory import write_checkpoint

        written = write_checkpoint(args.folder, args.size_gb)
        print(f"wrote a {written / 2**30:.2f} GiB random bf16 checkpoint to {args.folder}")
    checkpoint_bytes = sum(path.stat().st_size for path in args.folder.glob("*.safetensors"))
    rows = []
    for mode in MODES:
        runs = []
        for _ in range(args.repeats):
            command = [sys.executable, __file__, "--child", mode, "--folder", str(args.folder),
                       "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
                       "--batch-size", str(args.batch_size), "--dtype", args.dtype]
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        rows.append(min(runs, key=lambda row: row["seconds"]))
    calibration = next(row["seconds"] for row in rows if row["mode"] == "pass-cold")
    print(f"checkpoint: {checkpoint_bytes / 2**30:.2f} GiB in {len(list(args.folder.glob('*.safetensors')))} files; "
          f"calibration pass: {args.num_samples} x {args.seq_len} tokens, dtype {args.dtype}")
    print(f"{'measurement':<26}{'seconds':>10}{'GiB/s':>9}{'x one pass':>12}")
    for row in rows:
        row["ratio_to_pass"] = row["seconds"] / calibration
        rate = checkpoint_bytes / 2**30 / row["seconds"] if row["mode"] != "identity-cached" else float("nan")
        print(f"{LABELS[row['mode']]:<26}{row['seconds']:>10.3f}{rate:>9.2f}{row['ratio_to_pass']:>12.3f}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"checkpoint_bytes": checkpoint_bytes, "args": {
            key: str(value) for key, value in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
