"""Write the token ids of a moecompress calibration set to a safetensors file, so that another tool (llm-compressor,
in its own venv: benchmarks/peer_llmcompressor.py) calibrates on exactly the same tokens.

    python scripts/dump_calibration.py --model ../shared/testbed/models/moe-ref-mx --files ../shared/testbed/calib \
        --num-samples 32 --seq-len 256 --seed 0 --out runs/peer/calib_mx.safetensors

The ids are those of ``moecompress.calibration.load_calibration`` with the same arguments (every row starts with the
document separator); the file's metadata records the arguments and the set's sha256.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model folder whose tokenizer encodes the text")
    parser.add_argument("--files", nargs="+", required=True)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import safetensors.torch
    from transformers import AutoTokenizer

    from moecompress.calibration import load_calibration

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = load_calibration(tokenizer, files=args.files, num_samples=args.num_samples, seq_len=args.seq_len,
                                   seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"files": [str(f) for f in args.files], "num_samples": args.num_samples, "seq_len": args.seq_len,
                "seed": args.seed, "sha256": calibration.sha256}
    safetensors.torch.save_file({"input_ids": calibration.input_ids.contiguous()}, str(args.out),
                                metadata={"moecompress_calibration": json.dumps(metadata)})
    print(f"{tuple(calibration.input_ids.shape)} token ids -> {args.out} (sha256 {calibration.sha256[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
