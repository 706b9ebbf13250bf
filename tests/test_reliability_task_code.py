"""Code execution through task folders (issue 26, class 7): running Python from a task folder is an explicit opt-in.

lm-eval imports the module an ``!function`` tag names from beside the task YAML, and renders templates with an
unsandboxed Jinja. A task folder (and a recipe naming one in its ``evaluate`` stage) is a shared file, so
moecompress refuses such a folder unless the person running the command passes ``--allow-task-code`` (never the
recipe itself), before lm-eval reads it: the module is never imported. Checked through ``eval``, ``compress`` (the
recipe check) and the Python API; ``include:`` chains (also outside the folder) and template escapes are found too.
"""

from __future__ import annotations

import pytest
from conftest import TESTBED
from conftest import testbed_model_path as model_folder
from test_evals import write_mc_task

from moecompress.cli import main
from moecompress.errors import RecipeError, TaskError
from moecompress.evals.stage import EvaluateStage
from moecompress.evals.taskdefs import resolve_tasks, task_code_uses
from moecompress.recipe import parse_recipe
from moecompress.stages import RunContext

MX = model_folder("moe-ref-mx")
RECORDS = [{"context": "1 + 1 =", "choices": [" 2", " 3"], "gold": 0}, {"context": "2 + 2 =", "choices": [" 4", " 5"], "gold": 0}]


def task_folder_with_code(root, marker):
    """A valid multiple-choice task whose ``process_docs`` is ``!function utils.process_docs``; importing
    ``utils.py`` creates ``marker`` (the proof that code ran)."""
    folder = write_mc_task(root / "tasks", RECORDS)
    yaml_path = folder / "my_mc.yaml"
    yaml_path.write_text(yaml_path.read_text() + "process_docs: !function utils.process_docs\n")
    (folder / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                     "def process_docs(dataset):\n    return dataset\n")
    return folder


def one_line(captured) -> str:
    lines = [line for line in captured.err.strip().splitlines() if "━" not in line]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_eval_refuses_task_code_unless_allowed(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    folder = task_folder_with_code(tmp_path, marker)
    assert main(["eval", str(MX), "--tasks", "my_mc", "--include-path", str(folder), "--limit", "2"]) == 2
    message = one_line(capsys.readouterr())
    assert f"task folder {folder} runs Python code ({folder / 'my_mc.yaml'}: !function utils.process_docs)" in message
    assert "--allow-task-code" in message and "shared files" in message
    assert not marker.exists()  # refused before lm-eval read the folder
    resolved = resolve_tasks(["my_mc"], include_path=folder, allow_task_code=True)
    assert resolved.names == ["my_mc"] and marker.exists()  # allowed: lm-eval imports it as it always did


def test_compress_refuses_a_recipe_whose_evaluate_stage_names_task_code(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    folder = task_folder_with_code(tmp_path, marker)
    recipe = tmp_path / "shared-recipe.yaml"
    recipe.write_text(f"calibration: {{files: [{TESTBED / 'calib' / 'pycode.jsonl'}], num_samples: 2, seq_len: 16}}\n"
                      f"stages: [{{method: evaluate, tasks: [my_mc], limit: 2, include_path: {folder}}}]\n")
    assert main(["compress", str(MX), "--recipe", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "--allow-task-code" in one_line(capsys.readouterr())
    assert not marker.exists() and not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))
    stage = EvaluateStage({"tasks": ["my_mc"], "include_path": str(folder)})
    stage.check(RunContext(model=None, tokenizer=None, source=str(MX), output_dir=tmp_path, allow_task_code=True))
    assert marker.exists()  # the person running it allowed it: the check goes on to load the task


def test_a_recipe_cannot_allow_task_code_itself():
    with pytest.raises(RecipeError, match="unknown key 'allow_task_code'"):
        parse_recipe({"stages": [{"method": "evaluate", "tasks": ["tb_arith"], "allow_task_code": True}]})


def test_code_reached_through_an_include_outside_the_folder_is_found(tmp_path):
    marker = tmp_path / "code-ran"
    elsewhere = task_folder_with_code(tmp_path / "elsewhere", marker)
    folder = write_mc_task(tmp_path / "tasks", RECORDS, name="plain")
    (folder / "derived.yaml").write_text(f"include: {elsewhere / 'my_mc.yaml'}\ntask: derived\n")
    uses = task_code_uses(folder)
    assert uses == [f"{elsewhere / 'my_mc.yaml'}: !function utils.process_docs"]
    with pytest.raises(TaskError, match="runs Python code"):
        resolve_tasks(["plain"], include_path=folder)
    assert not marker.exists()


@pytest.mark.parametrize("template, reason", [
    ("{{ context.__class__.__mro__ }}", "reads the attribute __mro__"),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "reads the attribute __globals__"),
    ("{{ context['__class__'] }}", "reads the item '__class__'"),
    ("{{ context|attr('__class__') }}", "uses the attr filter"),
], ids=["dunder-attribute", "globals", "dunder-item", "attr-filter"])
def test_templates_that_reach_python_objects_are_task_code(tmp_path, template, reason):
    folder = write_mc_task(tmp_path / "tasks", RECORDS)
    yaml_path = folder / "my_mc.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("doc_to_text: context", f'doc_to_text: "{template}"'))
    with pytest.raises(TaskError, match=reason):
        resolve_tasks(["my_mc"], include_path=folder)


def test_a_folder_of_plain_tasks_needs_no_permission(tmp_path):
    folder = write_mc_task(tmp_path / "tasks", RECORDS)
    yaml_path = folder / "my_mc.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("doc_to_text: context",
                                                       'doc_to_text: "Q: {{ context }} {{ choices[0] }}"'))
    assert task_code_uses(folder) == []
    assert resolve_tasks(["my_mc"], include_path=folder).names == ["my_mc"]
