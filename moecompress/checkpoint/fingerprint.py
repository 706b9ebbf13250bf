"""Identities of a checkpoint folder.

:func:`source_identity` is what a compression run records to know whether a stopped or finished run may be reused:
the sha256 of ``config.json`` (parsed; key order and ``transformers_version`` ignored) and of **every byte** of every
safetensors file, so two checkpoints that differ anywhere never share a run. Hashing reads each file once; while it
does, every floating-point tensor is checked for NaN and infinity (a damaged source fails before any work, naming
the tensor). The per-file hashes can be reused from an earlier run (``cached``): a file is read again unless its
size, modification and change times, inode and device are all the ones recorded (the change time cannot be set by
a user, so a file rewritten in place with its old size and mtime is still read again). Cost: one read of the
checkpoint (``benchmarks/identity_cost.py`` measures it against one calibration pass).

:func:`routing_fingerprint` is what a PreMoe pattern store records, since its patterns depend on the routers.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moecompress.checkpoint.headers import read_header_bytes, read_safetensors_header
from moecompress.checkpoint.lazy import LazyCheckpoint, build_skeleton
from moecompress.errors import CheckpointError
from moecompress.models.families import find_moe_blocks

# torch dtypes of the safetensors floating-point dtypes (checked for NaN / infinity while hashing).
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_CHUNK_BYTES = 64 << 20  # hashed and checked per chunk: a chunk is still in cache when the check reads it
_STAT_KEYS = ("size", "mtime_ns", "ctime_ns", "inode", "device")


@dataclass
class SourceIdentity:
    """``fingerprint``: sha256 over the config and the files' hashes. ``files``: ``{file name: {"sha256", "size",
    "mtime_ns", "ctime_ns", "inode", "device"}}`` (what a later run may reuse); ``hashed``: the files read now."""

    fingerprint: str
    files: dict[str, dict] = field(default_factory=dict)
    hashed: list[str] = field(default_factory=list)


def source_identity(folder: Path, cached: dict[str, dict] | None = None, *, threads: int | None = None) -> SourceIdentity:
    """The identity of the checkpoint ``folder`` (see the module docstring); ``cached``: per-file records of an
    earlier call. Raises :class:`CheckpointError` naming the file and tensor when a tensor holds NaN or infinity.
    Call it on a folder :func:`moecompress.checkpoint.validation.validate_checkpoint` accepted."""
    folder = Path(folder)
    cached = cached or {}
    paths = sorted(folder.glob("*.safetensors"))
    records: dict[str, dict] = {}
    to_hash = []
    for path in paths:
        info = path.stat()  # through a link (hub caches link snapshot files to blobs): the data's own file
        record = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns,
                  "inode": info.st_ino, "device": info.st_dev}
        previous = cached.get(path.name)
        if (isinstance(previous, dict) and isinstance(previous.get("sha256"), str)
                and all(previous.get(key) == record[key] for key in _STAT_KEYS)):
            records[path.name] = {**record, "sha256": previous["sha256"]}
        else:
            records[path.name] = record
            to_hash.append(path)
    workers = max(1, min(len(to_hash), threads or min(4, os.cpu_count() or 1)))
    # hashlib and torch release the GIL on large buffers: shards hash in parallel
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, digest in zip(to_hash, pool.map(hash_and_check_file, to_hash)):
            records[path.name]["sha256"] = digest
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for path in paths:
        digest.update(f"\0{path.name}\0{records[path.name]['sha256']}".encode())
    return SourceIdentity(digest.hexdigest(), records, [path.name for path in to_hash])


def checkpoint_fingerprint(folder: Path) -> str:
    """sha256 identity of a checkpoint folder over its config and the full content of its safetensors files
    (:func:`source_identity` without a cache)."""
    return source_identity(folder).fingerprint


def hash_and_check_file(path: Path) -> str:
    """sha256 of every byte of one safetensors file, read once; each floating-point tensor is checked for NaN and
    infinity on the way (:class:`CheckpointError` naming it). The header is validated first (offsets contiguous,
    sizes matching dtypes), so the tensors' byte ranges cover the data exactly."""
    path = Path(path)
    entries = read_safetensors_header(path)
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK_BYTES)
    with path.open("rb", buffering=0) as handle:
        header = read_header_bytes(handle)
        digest.update(len(header).to_bytes(8, "little") + header)
        for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]  # contiguous from 0 (validated): the file is read in order
            dtype = _FLOAT_DTYPES.get(entry["dtype"])
            while begin < end:
                chunk = memoryview(buffer)[: _read_exactly(handle, buffer, min(end - begin, _CHUNK_BYTES), path)]
                digest.update(chunk)
                if dtype is not None and not _all_finite(chunk, dtype):
                    raise CheckpointError(
                        f"{path}: tensor {name} holds NaN or infinite values; the checkpoint is damaged (or was "
                        "saved from a diverged training run). moecompress does not compress non-finite weights: "
                        "re-download or re-save it.")
                begin += len(chunk)
                chunk.release()
    return digest.hexdigest()


def _read_exactly(handle, buffer: bytearray, size: int, path: Path) -> int:
    view = memoryview(buffer)
    done = 0
    while done < size:
        count = handle.readinto(view[done:size])
        if not count:
            raise CheckpointError(f"{path} is shorter than its header says (it changed while being read?); re-run")
        done += count
    view.release()
    return size


def _all_finite(chunk: memoryview, dtype: torch.dtype) -> bool:
    """Are all values of ``chunk`` (raw little-endian bytes of ``dtype``) finite? (no copy of the data)"""
    return all_finite(torch.frombuffer(chunk, dtype=dtype))


def all_finite(values: torch.Tensor) -> bool:
    """Does the floating-point tensor ``values`` hold no NaN and no infinity? One pass without a temporary the size
    of the tensor (``aminmax`` propagates NaN and returns an infinity when there is one)."""
    if values.numel() == 0:
        return True
    if values.element_size() == 1:  # float8: few kernels; small tensors in practice
        values = values.float()
    low, high = torch.aminmax(values.detach().reshape(-1))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


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
