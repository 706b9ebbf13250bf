"""Identities of a checkpoint folder: cheap to compute, specific enough to tell two checkpoints apart.

:func:`checkpoint_fingerprint` is what a compression run records to know whether a stopped run may be resumed;
:func:`routing_fingerprint` is what a PreMoe pattern store records, since its patterns depend on the routers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moecompress.checkpoint.headers import read_header_bytes, read_safetensors_header
from moecompress.checkpoint.lazy import LazyCheckpoint, build_skeleton
from moecompress.models.families import find_moe_blocks


def checkpoint_fingerprint(folder: Path, *, sample_bytes: int = 65_536, samples_per_file: int = 4) -> str:
    """sha256 identity of a checkpoint folder without reading all its data: ``config.json`` (parsed; key order and
    the ``transformers_version`` field ignored), and for every safetensors file its name, its header (names, dtypes,
    shapes, offsets) and ``samples_per_file`` blocks of ``sample_bytes`` spread over its data (so two trainings of
    one architecture, whose headers are equal, differ). Cost: a few small reads per file, whatever its size. Call
    it on a folder :func:`validate_checkpoint` accepted.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            header = read_header_bytes(handle)
            digest.update(path.name.encode() + b"\0" + header)
            data_start, file_size = 8 + len(header), path.stat().st_size
            span = max(file_size - data_start - sample_bytes, 0)
            for index in range(samples_per_file):
                handle.seek(data_start + span * index // max(samples_per_file - 1, 1))
                digest.update(handle.read(sample_bytes))
    return digest.hexdigest()


def routing_fingerprint(folder: str | Path) -> str:
    """sha256 of ``config.json``, every safetensors header (names, dtypes, shapes) and the router weights.

    Cheap (no expert is read) and specific enough that a pattern store built for one model is not used with another:
    TCESS depends on the routers, so two checkpoints with the same shapes but other routers differ.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    digest.update(json.dumps(config, sort_keys=True).encode())
    for path in sorted(folder.glob("*.safetensors")):
        described = {name: [entry["dtype"], entry["shape"]] for name, entry in read_safetensors_header(path).items()}
        digest.update(json.dumps(described, sort_keys=True).encode())
    skeleton, _ = build_skeleton(folder)
    checkpoint = LazyCheckpoint(folder)
    names = {id(module): name for name, module in skeleton.named_modules()}
    for view in find_moe_blocks(skeleton):
        router = view.router_linear if view.router_linear is not None else view.router
        key = f"{names[id(router)]}.weight"
        if key in checkpoint.files:
            digest.update(checkpoint.read(key).float().numpy().tobytes())
    checkpoint.close()
    return digest.hexdigest()
