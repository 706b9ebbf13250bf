"""Evaluation tasks: the bundled offline test-bed tasks, a user's task folder, and lm-eval's own tasks by name.

Task definitions are lm-eval YAML files. The bundled ones live in ``moecompress/evals/tasks/`` with their data in
``tasks/data/*.jsonl``; their ``data_files`` are written relative to the YAML file. lm-eval would resolve a relative
path against the working directory, so :func:`resolve_tasks` loads each local YAML itself, rewrites relative data
paths against the YAML's folder, checks the data (every record has the fields the templates use, the gold index is
in range) and hands lm-eval a finished config dict. Names that are not local (``hellaswag``...) are passed through
to lm-eval's built-in task index, which needs the dataset hub unless the data is already cached.

A task folder of your own (``include_path``) can run Python: lm-eval imports the module an ``!function`` tag names
from beside the YAML, and renders ``doc_to_*`` templates with an unsandboxed Jinja that reaches Python objects
through ``__`` attributes. A task folder, like a recipe that names one, is something people share, so moecompress
runs such code only when the person running the command allows it (``--allow-task-code``): otherwise
:func:`resolve_tasks` refuses the folder before lm-eval reads it, naming the file and the code
(:func:`task_code_uses`, a read of the YAML that never imports or renders anything).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes

from moecompress.errors import TaskError, describe_value
from moecompress.yaml_files import load_yaml_bounded

BUNDLED_TASK_DIR = Path(__file__).resolve().parent / "tasks"

# Output types whose docs pick one of several choices; their gold index must fall inside the choice list.
CHOICE_OUTPUT_TYPES = {"multiple_choice"}
# Folders lm-eval skips when it indexes a task folder (lm_eval.tasks._yaml_loader._IGNORE_DIRS).
_IGNORED_TASK_DIRS = {"__pycache__", ".ipynb_checkpoints"}
MAX_TASK_YAML_VALUES = 100_000  # values of one task file after YAML aliases expand (a bomb is refused)
ALLOW_TASK_CODE_HINT = ("pass --allow-task-code (eval, compress) or allow_task_code=True (Python) if you trust "
                        "that folder, after reading its code")


@dataclass
class ResolvedTasks:
    """What lm-eval's ``simple_evaluate`` needs: task specs (config dicts or names) and the manager that knows them.

    specs: one entry per task: a config dict (local tasks, data paths made absolute) or a name (lm-eval tasks,
        user groups and tags).
    task_manager: a ``lm_eval.tasks.TaskManager`` indexing the bundled folder, the user's folder and, only when a
        non-local name was asked for, lm-eval's built-in tasks.
    names: the task names, in the order asked (tags expanded).
    """

    specs: list[dict[str, Any] | str]
    task_manager: Any
    names: list[str] = field(default_factory=list)


def bundled_task_names() -> list[str]:
    """Names of the tasks shipped with moecompress (one YAML each in ``moecompress/evals/tasks/``)."""
    return sorted(path.stem for path in BUNDLED_TASK_DIR.glob("*.yaml"))


def _task_manager(include_paths: list[Path], include_defaults: bool):
    from lm_eval.tasks import TaskManager  # lm-eval takes seconds to import: only when tasks are resolved

    return TaskManager(include_path=[str(path) for path in include_paths], include_defaults=include_defaults)


def _offline() -> bool:
    return any(os.environ.get(name, "0") not in ("", "0", "false", "False") for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def resolve_tasks(task_names: list[str], include_path: str | Path | None = None, *,
                  allow_task_code: bool = False) -> ResolvedTasks:
    """Turn task names into lm-eval specs, checking every local task's data before any model work starts.

    task_names: bundled task names (``tb_code_next``), tags (``testbed``, ``testbed_mc``, ``testbed_ppl``), names from
        ``include_path``, or lm-eval task names (these need the hub, or a cached copy of their data).
    include_path: a folder of the user's own lm-eval YAML tasks; its tasks win over bundled ones of the same name.
    allow_task_code: let that folder's tasks run Python (``!function`` modules, templates reaching Python objects);
        without it such a folder is a :class:`TaskError` saying why, before lm-eval reads it.
    """
    if not task_names:
        raise TaskError(f"no evaluation task given; pass task names, e.g. one of: {', '.join(bundled_task_names())}")
    include_paths = [BUNDLED_TASK_DIR]
    if include_path is not None:
        user_dir = Path(include_path).expanduser().resolve()
        if not user_dir.is_dir():
            raise TaskError(f"task folder {user_dir} does not exist; pass --include-path a folder of lm-eval YAML tasks")
        uses = task_code_uses(user_dir)
        if uses and not allow_task_code:
            raise TaskError(
                f"task folder {user_dir} runs Python code ({uses[0]}{f'; {len(uses) - 1} more' if len(uses) > 1 else ''})"
                f"; moecompress does not run code from a task folder unless you allow it, since task folders and the "
                f"recipes naming them are shared files: {ALLOW_TASK_CODE_HINT}"
            )
        include_paths.append(user_dir)
    local_manager = _task_manager(include_paths, include_defaults=False)
    local_index = local_manager.task_index

    from lm_eval.tasks._index import Kind  # lm-eval takes seconds to import: only when tasks are resolved

    specs: list[dict[str, Any] | str] = []
    names: list[str] = []
    remote_names: list[str] = []
    for name in task_names:
        entry = local_index.get(name)
        if entry is None:
            remote_names.append(name)
            specs.append(name)
            names.append(name)
        elif entry.kind == Kind.TAG and all(
            local_index.get(member) is not None and local_index[member].kind == Kind.TASK for member in entry.tags
        ):
            for member in sorted(entry.tags):  # expand tags so that each member's data gets checked
                specs.append(local_task_config(local_index[member].yaml_path))
                names.append(member)
        elif entry.kind == Kind.TASK and entry.yaml_path is not None:
            specs.append(local_task_config(entry.yaml_path))
            names.append(name)
        else:  # a user group or a Python task: lm-eval builds it from the index
            specs.append(name)
            names.append(name)

    if not remote_names:
        return ResolvedTasks(specs=specs, task_manager=local_manager, names=names)

    full_manager = _task_manager(include_paths, include_defaults=True)
    unknown = [name for name in remote_names if name not in full_manager.task_index]
    if unknown:
        raise TaskError(
            f"unknown evaluation task(s): {', '.join(unknown)}. Bundled tasks (offline): "
            f"{', '.join(bundled_task_names())}; tags: testbed, testbed_mc, testbed_ppl. Your own tasks: pass "
            "--include-path DIR with lm-eval YAML files. lm-eval's task names (e.g. hellaswag) also work when the "
            "dataset hub can be reached."
        )
    if _offline():
        check_cached_offline(full_manager, remote_names)
    return ResolvedTasks(specs=specs, task_manager=full_manager, names=names)


def task_code_uses(folder: Path) -> list[str]:
    """What in the task folder ``folder`` would run Python if lm-eval loaded it: every ``!function`` tag, and every
    Jinja template that reaches an attribute or item whose name starts with ``_`` (the way out of a template to
    Python objects; Jinja's sandbox refuses exactly those) or uses the ``attr`` filter. Reads every ``*.yaml`` under
    ``folder`` as lm-eval indexes them, following ``include:`` (also outside the folder); imports nothing, renders
    nothing. Each entry: ``"<file>: <what>"``. A task file whose aliases explode is a :class:`TaskError`."""
    uses: list[str] = []
    seen: set[Path] = set()
    for yaml_path in sorted(folder.glob("**/*.yaml")):
        if not any(part in _IGNORED_TASK_DIRS for part in yaml_path.parts):
            _scan_task_yaml(yaml_path, uses, seen)
    return uses


def _scan_task_yaml(yaml_path: Path, uses: list[str], seen: set[Path]) -> None:
    yaml_path = yaml_path.expanduser().resolve()
    if yaml_path in seen:
        return
    seen.add(yaml_path)
    functions: list[str] = []
    try:
        text = yaml_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return  # lm-eval cannot read it either: it skips the file
    try:
        data = load_yaml_bounded(text, max_values=MAX_TASK_YAML_VALUES, where=f"task file {yaml_path}", error=TaskError,
                                 tags={"!function": lambda name: functions.append(name) or name})
    except TaskError as error:
        if "not valid YAML" in str(error):
            return  # lm-eval skips a file it cannot parse
        raise
    uses.extend(f"{yaml_path}: !function {name:.80}" for name in functions)
    for template in _strings(data):
        if ("{{" in template or "{%" in template) and (reason := _template_escape(template)):
            uses.append(f"{yaml_path}: template {template[:60]!r} {reason}")
    includes = data.get("include") if isinstance(data, dict) else None
    for include in includes if isinstance(includes, list) else [includes] if includes else []:
        if isinstance(include, str):
            path = Path(include)
            _scan_task_yaml(path if path.is_absolute() else yaml_path.parent / path, uses, seen)


def _strings(data: Any) -> list[str]:
    """Every string in ``data`` (containers shared through YAML aliases are visited once)."""
    found, seen, stack = [], set(), [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, (dict, list)) and id(value) not in seen:
            seen.add(id(value))
            stack.extend([*value.keys(), *value.values()] if isinstance(value, dict) else value)
    return found


def _template_escape(template: str) -> str | None:
    """Why the Jinja ``template`` can reach Python objects, or None: an attribute or item whose name starts with
    ``_``, or the ``attr`` filter (what Jinja's ``SandboxedEnvironment`` would refuse)."""
    try:
        tree = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return None  # lm-eval cannot render it either
    for node in tree.find_all((jinja2.nodes.Getattr, jinja2.nodes.Getitem, jinja2.nodes.Filter)):
        if isinstance(node, jinja2.nodes.Getattr) and node.attr.startswith("_"):
            return f"reads the attribute {node.attr}"
        if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const) \
                and isinstance(node.arg.value, str) and node.arg.value.startswith("_"):
            return f"reads the item {node.arg.value!r}"
        if isinstance(node, jinja2.nodes.Filter) and node.name == "attr":
            return "uses the attr filter"
    return None


def hub_datasets(task_manager, name: str, depth: int = 0) -> list[tuple[str, str | None]]:
    """``[(dataset path, config name)]`` a lm-eval task (or each task of a group or tag) reads from the hub; local
    builders (json, csv, a folder) are left out."""
    entry = task_manager.task_index.get(name)
    if entry is None or depth > 4:
        return []
    config = getattr(entry, "cfg", None) or {}
    path = config.get("dataset_path")
    if isinstance(path, str):
        local = path in ("json", "csv", "parquet", "text", "arrow") or Path(path).expanduser().exists()
        return [] if local else [(path, config.get("dataset_name"))]
    members = [task for task in config.get("task") or [] if isinstance(task, str)] if isinstance(
        config.get("task"), list) else []
    members += sorted(getattr(entry, "tags", None) or []) if not members else []
    return [dataset for member in members for dataset in hub_datasets(task_manager, member, depth + 1)]


def check_cached_offline(task_manager, task_names: list[str]) -> None:
    """Offline mode: every hub dataset the tasks read must be in the datasets cache, else one :class:`TaskError`
    now, before any model work (not a failure after the profiling pass)."""
    # the datasets library (heavy) only for tasks that come from the hub while offline
    import datasets

    missing: dict[str, list[str]] = {}
    for name in task_names:
        for path, config_name in hub_datasets(task_manager, name):
            try:
                datasets.load_dataset_builder(path, config_name)
            except Exception:  # noqa: BLE001 - offline, any failure means "not usable from the cache"
                missing.setdefault(name, []).append(path + (f" ({config_name})" if config_name else ""))
    if missing:
        needs = "; ".join(f"{name} needs {', '.join(sorted(set(paths)))}" for name, paths in missing.items())
        raise TaskError(
            f"offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and hub task data is not in the datasets "
            f"cache: {needs}. Unset offline mode to download it, or use the bundled tasks "
            f"({', '.join(bundled_task_names()[:3])}, ...; tags testbed, testbed_mc, testbed_ppl) or your own "
            "(--include-path DIR / include_path)"
        )


def local_task_config(yaml_path: str | Path) -> dict[str, Any]:
    """Load one local lm-eval YAML task as a config dict, with its local data files made absolute and checked."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval takes seconds to import: only when tasks are read

    yaml_path = Path(yaml_path).resolve()
    try:
        config = load_yaml(yaml_path, resolve_func=True)
    except Exception as error:  # yaml syntax, a missing include, a bad !function
        raise TaskError(f"task file {yaml_path} cannot be read ({error}); fix the YAML") from error
    for structural_key in ("tag", "group", "task_list"):
        config.pop(structural_key, None)
    data_files = _absolute_data_files(config, yaml_path)
    for split_files in data_files.values():
        for data_file in split_files:
            validate_task_data(config, data_file, task_file=yaml_path)
    return config


def _absolute_data_files(config: dict[str, Any], yaml_path: Path) -> dict[str, list[Path]]:
    """Rewrite ``dataset_kwargs.data_files`` relative to the YAML's folder (in place); return {split: [paths]}."""
    dataset_kwargs = config.get("dataset_kwargs") or {}
    data_files = dataset_kwargs.get("data_files")
    if data_files is None:
        return {}
    if isinstance(data_files, (str, list)):
        data_files = {"train": data_files}
    resolved: dict[str, list[Path]] = {}
    rewritten: dict[str, Any] = {}
    for split, files in data_files.items():
        file_list = [files] if isinstance(files, str) else list(files)
        paths = []
        for data_file in file_list:
            path = Path(data_file).expanduser()
            if not path.is_absolute():
                path = (yaml_path.parent / path).resolve()
            if not path.is_file():
                raise TaskError(
                    f"task {config.get('task', yaml_path.stem)}: data file {path} (split '{split}', from {yaml_path}) "
                    "does not exist; fix dataset_kwargs.data_files (relative paths are relative to the YAML file)"
                )
            paths.append(path)
        resolved[split] = paths
        rewritten[split] = [str(path) for path in paths] if isinstance(files, list) else str(paths[0])
    config["dataset_kwargs"] = {**dataset_kwargs, "data_files": rewritten}
    return resolved


def _template_fields(template: Any) -> set[str]:
    """Document fields a lm-eval ``doc_to_*`` entry reads: a plain field name, or the variables of a Jinja template."""
    if not isinstance(template, str) or template == "":
        return set()  # an int, a list, a callable (!function): nothing to check by name
    if template.isidentifier():
        return {template}
    environment = jinja2.Environment()
    try:
        return set(jinja2.meta.find_undeclared_variables(environment.parse(template)))
    except jinja2.TemplateSyntaxError as error:
        raise TaskError(f"template {describe_value(template)} is not valid Jinja ({error}); fix the task YAML") from error


def _read_records(data_file: Path) -> list[dict[str, Any]]:
    """Records of a .jsonl or .json data file; anything else is left to the ``datasets`` builder."""
    if data_file.suffix == ".jsonl":
        records = []
        with data_file.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise TaskError(f"{data_file}, line {line_number}: not valid JSON ({error.msg}); fix the line") from error
                if not isinstance(record, dict):
                    raise TaskError(f"{data_file}, line {line_number}: expected a JSON object per line, got {type(record).__name__}")
                records.append(record)
        return records
    if data_file.suffix == ".json":
        try:
            payload = json.loads(data_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise TaskError(f"{data_file}: not valid JSON ({error.msg}); fix the file") from error
        return payload if isinstance(payload, list) else []
    return []


def validate_task_data(config: dict[str, Any], data_file: Path, *, task_file: Path | None = None) -> None:
    """Check a task's data against its definition; raise :class:`TaskError` naming the file, line and field.

    Checks: the file is not empty; every record has each field the ``doc_to_text``/``doc_to_choice``/
    ``doc_to_target`` templates read; for multiple choice with plain field names, the choices are a non-empty list of
    strings and the gold index is an integer inside it.
    """
    task_name = config.get("task", data_file.stem)
    records = _read_records(data_file)
    if data_file.suffix in (".jsonl", ".json") and not records:
        raise TaskError(f"task {task_name}: data file {data_file} holds no records; fill it or remove the task")
    templates = {key: config.get(key) for key in ("doc_to_text", "doc_to_choice", "doc_to_target") if key in config}
    needed = {key: _template_fields(value) for key, value in templates.items()}
    choice_field = templates.get("doc_to_choice") if isinstance(templates.get("doc_to_choice"), str) else None
    target_field = templates.get("doc_to_target") if isinstance(templates.get("doc_to_target"), str) else None
    is_choice_task = config.get("output_type") in CHOICE_OUTPUT_TYPES
    for line_number, record in enumerate(records, start=1):
        where = f"task {task_name}: {data_file}, record {line_number}"
        for key, fields in needed.items():
            missing = sorted(fields - record.keys())
            if missing:
                raise TaskError(
                    f"{where}: missing field(s) {', '.join(missing)} used by {key} "
                    f"(record has: {', '.join(sorted(record)) or 'nothing'}); fix the data or the task's {key}"
                )
        if not (is_choice_task and choice_field and choice_field.isidentifier()):
            continue
        choices = record[choice_field]
        if not isinstance(choices, list) or not choices or not all(isinstance(choice, str) for choice in choices):
            raise TaskError(f"{where}: field '{choice_field}' must be a non-empty list of strings, got {choices!r:.80}")
        if target_field and target_field.isidentifier():
            gold = record[target_field]
            if isinstance(gold, bool) or not isinstance(gold, int):
                if isinstance(gold, str) and gold in choices:
                    continue  # lm-eval also accepts the gold choice's text
                raise TaskError(
                    f"{where}: field '{target_field}' must be the index of the right choice (an integer), got "
                    f"{describe_value(gold)}"
                )
            if not 0 <= gold < len(choices):
                raise TaskError(
                    f"{where}: field '{target_field}' = {gold} is out of range for {len(choices)} choices "
                    f"(valid: 0..{len(choices) - 1}); fix the gold index"
                )
