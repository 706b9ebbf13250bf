"""Everything about files on disk: the one layer that reads and writes checkpoints.

* :mod:`~moecompress.checkpoint.headers`: safetensors headers (the one reader), sizes from headers;
* :mod:`~moecompress.checkpoint.validation`: folder or hub id resolution, the one validation every command runs;
* :mod:`~moecompress.checkpoint.fingerprint`: a checkpoint's identity (run resume, pattern stores);
* :mod:`~moecompress.checkpoint.native`: the native format (``quant_method: moecompress``), its transformers
  quantizer, meta skeletons of what a checkpoint holds, saving a model;
* :mod:`~moecompress.checkpoint.loading`: :func:`load_model`;
* :mod:`~moecompress.checkpoint.lazy`: reading one module's weights at a time into a meta skeleton;
* :mod:`~moecompress.checkpoint.partial`: assembling a model from its kept experts only;
* :mod:`~moecompress.checkpoint.shards`: writing checkpoints shard by shard;
* :mod:`~moecompress.checkpoint.native_reader`: reading a native folder tensor by tensor (for the exports).
"""

import importlib

# The names most callers need, each imported from its module on first use: `import moecompress` imports
# `checkpoint.native` (to register the native format) and must not pay for the loaders, accelerate and hub clients.
_EXPORTS = {
    "LazyCheckpoint": "moecompress.checkpoint.lazy",
    "MoECompressQuantizationConfig": "moecompress.checkpoint.native",
    "build_meta_model": "moecompress.checkpoint.native",
    "build_skeleton": "moecompress.checkpoint.lazy",
    "checkpoint_fingerprint": "moecompress.checkpoint.fingerprint",
    "has_tokenizer_files": "moecompress.checkpoint.validation",
    "load_config": "moecompress.checkpoint.validation",
    "load_model": "moecompress.checkpoint.loading",
    "local_checkpoint_folder": "moecompress.checkpoint.validation",
    "needs_native_format": "moecompress.checkpoint.native",
    "register_native_format": "moecompress.checkpoint.native",
    "resolve_checkpoint": "moecompress.checkpoint.validation",
    "save_model": "moecompress.checkpoint.native",
    "validate_checkpoint": "moecompress.checkpoint.validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moecompress.checkpoint' has no attribute {name!r}")
