"""``quant_method: moecompress`` made known to transformers on ``import moecompress``, without importing torch or
transformers then (they take seconds; ``import moecompress`` must stay light).

transformers looks a checkpoint's ``quant_method`` up in two dicts of ``transformers.quantizers.auto`` and then calls
``CONFIG.from_dict(...)`` and ``QUANTIZER(config, ...)``. Two stand-ins are put there, which import the real classes
(:mod:`moecompress.checkpoint.native`) the first time a native checkpoint is loaded, and the real classes then
replace them. The dicts are filled at once when transformers' module is already imported, else right after it is
(an import hook that watches for that one module and removes itself).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

QUANT_METHOD = "moecompress"
TARGET_MODULE = "transformers.quantizers.auto"
NATIVE_MODULE = "moecompress.checkpoint.native"


def _native():
    """The real native-format module (imports torch and transformers); importing it registers the real classes."""
    module = importlib.import_module(NATIVE_MODULE)
    module.register_native_format()
    return module


class LazyQuantizationConfig:
    """Stands in for :class:`~moecompress.checkpoint.native.MoECompressQuantizationConfig` in transformers'
    registry until a native checkpoint is loaded."""

    @classmethod
    def from_dict(cls, config_dict, *args, **kwargs):
        return _native().MoECompressQuantizationConfig.from_dict(config_dict, *args, **kwargs)


class LazyQuantizer:
    """Stands in for :class:`~moecompress.checkpoint.native.MoECompressQuantizer` (calling it builds the real one)."""

    def __new__(cls, quantization_config, **kwargs):
        return _native().MoECompressQuantizer(quantization_config, **kwargs)


def register_stand_ins(auto_module) -> None:
    """Put the stand-ins into ``transformers.quantizers.auto``'s dicts, unless a class is already registered."""
    auto_module.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, LazyQuantizationConfig)
    auto_module.AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, LazyQuantizer)


class _AfterTransformersQuantizers(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` through the finders after it and registers the stand-ins once that
    module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET_MODULE:
            return None
        finders = sys.meta_path[sys.meta_path.index(self) + 1:] if self in sys.meta_path else []
        for finder in finders:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module):
            run_module(module)
            _remove_hook()
            register_stand_ins(module)

        loader.exec_module = exec_module
        return spec


_HOOK = _AfterTransformersQuantizers()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def register_native_format_lazily() -> None:
    """Register now when transformers' quantizer registry is loaded, else as soon as it is (idempotent)."""
    auto_module = sys.modules.get(TARGET_MODULE)
    if auto_module is not None and hasattr(auto_module, "AUTO_QUANTIZER_MAPPING"):
        register_stand_ins(auto_module)
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
