"""Recipes: a YAML file (or dict) describing calibration data and a list of stages, validated before any work.

```yaml
calibration:            # optional; default: the bundled set, 64 x 512 tokens
  files: [data/calib]   # .jsonl (text, optional domain) / .txt files or folders; or `bundled`
  # dataset: wikitext   # a Hugging Face dataset instead (needs network)
  num_samples: 64
  seq_len: 512
  seed: 0
stages:                 # may be empty: the run then only profiles the model and writes the report
  - method: prune_frequency
    num_experts_to_keep: 24
```

Every problem is a :class:`moecompress.errors.RecipeError` naming where it is (``stages[1] (prune_frequency):
num_experts_to_keep``), what is wrong, and what is allowed. Relative calibration paths resolve against the
recipe file's folder.

A recipe is a file people share, so reading one is bounded: at most :data:`MAX_RECIPE_BYTES`, YAML anchors and
aliases that expand to at most :data:`MAX_RECIPE_VALUES` values (a 2 KB "billion laughs" file expands to billions),
and error messages show a short excerpt of a bad value, never the whole value.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from moecompress.calibration.ebss import EbssOptions
from moecompress.errors import RecipeError, describe_value
from moecompress.export.options import ExportOptions, parse_export
from moecompress.stages import STAGE_REGISTRY, Stage
from moecompress.stages import format_validation_error as _format_validation_error
from moecompress.yaml_files import load_yaml_bounded

RECIPE_KEYS = ("calibration", "stages", "export")
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000  # values after expanding YAML aliases; a long recipe has a few hundred


class CalibrationConfig(pydantic.BaseModel):
    """``calibration:`` section. ``files`` and ``dataset`` are exclusive; neither means the bundled set. With
    ``ebss``, the model generates the set (``files``/``dataset`` are then the text it is compared with)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    files: list[str] | None = None
    dataset: str | None = None  # a hub id or a local folder in the datasets layout
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_field: str | None = None  # the dataset's text field (default `text`, else a chat messages field)
    chat_template: bool | None = None  # chat messages: the tokenizer's template (default), or false: plain text
    num_samples: int = pydantic.Field(64, ge=1)
    seq_len: int = pydantic.Field(512, ge=2)
    seed: int = 0
    batch_size: int = pydantic.Field(8, ge=1)
    ebss: EbssOptions | None = None

    @pydantic.field_validator("files", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @pydantic.field_validator("ebss", mode="before")
    @classmethod
    def _ebss_section(cls, value):
        """Validate ``ebss:`` on its own, so its errors list its keys (not the calibration section's)."""
        if value is None or isinstance(value, EbssOptions):
            return value
        if not isinstance(value, dict):
            raise ValueError("`ebss` must be a mapping (num_samples, seq_len, tau, beam, ...)")
        try:
            return EbssOptions.model_validate(value)
        except pydantic.ValidationError as error:
            raise ValueError(_format_validation_error("ebss", error, EbssOptions).removeprefix("ebss: ")) from None

    @pydantic.model_validator(mode="after")
    def _files_or_dataset(self):
        if self.files and self.dataset:
            raise ValueError("give either `files` or `dataset`, not both")
        if not self.dataset and (self.text_field is not None or self.chat_template is not None):
            raise ValueError("`text_field` and `chat_template` apply to a `dataset`; files are .jsonl with a `text` "
                             "field or .txt")
        return self


@dataclass
class Recipe:
    """A validated recipe: calibration settings, stage instances, and the dict it came from (for the report)."""

    calibration: CalibrationConfig
    stages: list[Stage]
    source: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    exports: list[ExportOptions] = field(default_factory=list)  # not in the run identity

    @property
    def sha256(self) -> str:
        """Hash of the normalised recipe (what resuming a stopped run compares)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration.model_dump(mode="json", exclude_none=True),
            "stages": [stage.describe() for stage in self.stages],
        }


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file: a folder, an unreadable file, invalid YAML and an empty file (nothing
    but comments or blanks) are each a :class:`RecipeError`."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a folder; pass the path of a .yaml recipe file (see recipes/)")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist; pass the path of a .yaml recipe (see recipes/)")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path} is {path.stat().st_size} bytes; a recipe is a short YAML file (at most "
                          f"{MAX_RECIPE_BYTES} bytes). Pass the recipe, not a data file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"recipe {path} cannot be read ({error}); pass a UTF-8 .yaml recipe file") from None
    data = load_yaml_bounded(text, max_values=MAX_RECIPE_VALUES, where=f"recipe {path}", error=RecipeError)
    if data is None:
        raise RecipeError(f"recipe {path} is empty; write at least `stages: []` (profile only) or a list of stages "
                          "(see recipes/)")
    recipe = parse_recipe(data, base_dir=path.parent)
    recipe.path = path
    return recipe


def parse_recipe(data: Any, *, base_dir: str | Path | None = None) -> Recipe:
    """Validate a recipe dict: top-level keys, the calibration section, each stage's method and options."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping with keys {list(RECIPE_KEYS)}, got {type(data).__name__}")
    unknown = [key for key in data if key not in RECIPE_KEYS]
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {describe_value(unknown)}; a recipe has only {list(RECIPE_KEYS)}")
    calibration = _parse_calibration(data.get("calibration") or {}, base_dir)
    raw_stages = data.get("stages", [])
    if raw_stages is None:
        raw_stages = []
    if not isinstance(raw_stages, list):
        raise RecipeError(f"`stages` must be a list of {{method: NAME, ...}} entries, got {type(raw_stages).__name__}")
    stages = [_parse_stage(index, entry) for index, entry in enumerate(raw_stages)]
    check_stage_order(stages)
    exports = parse_export(data["export"]) if data.get("export") is not None else []
    return Recipe(calibration=calibration, stages=stages, source=data, exports=exports)


# Stages that replace the fused experts by quantised ones, which cannot hold a `router_rule: remap` merge's map.
QUANTIZING_METHODS = ("rtn", "gptq", "camera_q")


def check_stage_order(stages: list[Stage]) -> None:
    """Refuse stage orders that cannot work, before any stage runs."""
    remap_merge = next((index for index, stage in enumerate(stages)
                        if getattr(stage.options, "router_rule", None) == "remap"), None)
    if remap_merge is None:
        return
    later_quantizer = next((stage for stage in stages[remap_merge + 1:] if stage.method in QUANTIZING_METHODS), None)
    if later_quantizer is not None:
        raise RecipeError(f"stage {later_quantizer.method} cannot quantise experts merged by "
                          f"{stages[remap_merge].method} with router_rule: remap (the full router stays and maps onto "
                          "merged experts, which quantised experts cannot hold yet); set router_rule: collapse")


def known_methods() -> list[str]:
    _import_stage_modules()
    return sorted(STAGE_REGISTRY)


def _parse_calibration(section: Any, base_dir) -> CalibrationConfig:
    if not isinstance(section, dict):
        raise RecipeError(f"`calibration` must be a mapping (files/dataset, num_samples, seq_len, seed), got "
                          f"{describe_value(section)}")
    try:
        config = CalibrationConfig(**section)
    except pydantic.ValidationError as error:
        raise RecipeError(_format_validation_error("calibration", error, CalibrationConfig)) from None
    if config.files and base_dir is not None:
        config.files = [entry if entry == "bundled" or Path(entry).expanduser().is_absolute()
                        else str((Path(base_dir) / entry).resolve()) for entry in config.files]
    if config.dataset and base_dir is not None and (Path(base_dir) / config.dataset).is_dir():
        config.dataset = str((Path(base_dir) / config.dataset).resolve())  # a local dataset folder beside the recipe
    return config


def _parse_stage(index: int, entry: Any) -> Stage:
    where = f"stages[{index}]"
    if not isinstance(entry, dict) or "method" not in entry:
        raise RecipeError(f"{where} must be a mapping with a `method` key, e.g. {{method: prune_frequency, ...}}; got "
                          f"{describe_value(entry)}")
    options = dict(entry)
    method = options.pop("method")
    methods = known_methods()
    if not isinstance(method, str) or method not in STAGE_REGISTRY:
        failed = f" (modules that failed to import: {_IMPORT_FAILURES})" if _IMPORT_FAILURES else ""
        raise RecipeError(f"{where}: unknown method {describe_value(method)}; known methods: {', '.join(methods)}{failed}")
    stage_class = STAGE_REGISTRY[method]
    try:
        return stage_class(stage_class.Options(**options))  # validated here, so errors name the recipe's place
    except pydantic.ValidationError as error:
        raise RecipeError(_format_validation_error(f"{where} ({method})", error, stage_class.Options)) from None


# Where stages live: every module of these packages (pruning, quantization), and modules of the others whose
# name mentions "stage" (evals: importing lm-eval for nothing would slow every recipe check down).
_STAGE_PACKAGES_ALL = ("moecompress.pruning", "moecompress.quantization")
_STAGE_PACKAGES_NAMED = ("moecompress.evals", "moecompress.analysis", "moecompress.export")
_IMPORT_FAILURES: dict[str, str] = {}


def _import_stage_modules() -> None:
    """Stages register themselves on import; import every module that may define some.

    A module that fails to import (someone's work in progress) is skipped and named in the unknown-method error.
    """
    for package_name in (*_STAGE_PACKAGES_ALL, *_STAGE_PACKAGES_NAMED):
        try:
            package = importlib.import_module(package_name)
        except Exception as error:  # noqa: BLE001 - reported, not hidden
            _IMPORT_FAILURES[package_name] = f"{type(error).__name__}: {error}"
            continue
        for module in pkgutil.iter_modules(package.__path__):
            if package_name in _STAGE_PACKAGES_NAMED and "stage" not in module.name:
                continue
            name = f"{package_name}.{module.name}"
            try:
                importlib.import_module(name)
            except Exception as error:  # noqa: BLE001
                _IMPORT_FAILURES[name] = f"{type(error).__name__}: {error}"
