"""The layout of ``moecompress.models.families``: each family module defines adapters, the package registers them.

Every adapter a family module defines is registered under its own ``model_type`` (a defined but unregistered adapter
would silently be unsupported), every registered adapter comes from exactly one family module, and each family
module's docstring names the model_types (and aliases) it defines, so an architecture is found by reading file heads.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import moecompress.models.families as families
from moecompress.models.families import ADAPTERS, FamilyAdapter

# The modules of the package that hold no family: the adapter type and registry, shared helpers, the lookups.
NOT_FAMILY_MODULES = {"registry", "shared_routing", "lookup"}


def family_modules() -> list[ModuleType]:
    names = [info.name for info in pkgutil.iter_modules(families.__path__) if info.name not in NOT_FAMILY_MODULES]
    return [importlib.import_module(f"{families.__name__}.{name}") for name in names]


def defined_adapters(module: ModuleType) -> list[FamilyAdapter]:
    return [value for value in vars(module).values() if isinstance(value, FamilyAdapter)]


def test_every_adapter_a_family_module_defines_is_registered():
    for module in family_modules():
        for adapter in defined_adapters(module):
            assert ADAPTERS.get(adapter.model_type) is adapter, f"{module.__name__} defines {adapter.model_type}"


def test_every_registered_adapter_comes_from_one_family_module():
    defined = [adapter for module in family_modules() for adapter in defined_adapters(module)]
    assert len({adapter.model_type for adapter in defined}) == len(defined)
    assert {id(adapter) for adapter in ADAPTERS.values()} == {id(adapter) for adapter in defined}


def test_family_module_docstrings_name_their_model_types():
    for module in family_modules():
        adapters = defined_adapters(module)
        keys = [key for key, adapter in ADAPTERS.items() if any(adapter is own for own in adapters)]
        missing = [key for key in keys if f"``{key}``" not in (module.__doc__ or "")]
        assert not missing, f"{module.__name__}'s docstring does not name {missing}"
