"""Unbounded work from small inputs (issue 26, class 4): every size is bounded by the model, with a clear message.

* ``group_size`` far beyond any matrix width (a 30-character recipe once asked for hundreds of GB) is refused before
  any work by every stage that quantises, naming the widest input the model has.
* A recipe (or a task file) of a few KB whose YAML aliases expand to billions of values, refers to itself, or nests
  deeper than data does, is refused in milliseconds; error messages show a short excerpt of a bad value, never all.
* A prompt longer than the model's context is refused before it is scored (before it is even tokenized when its
  bytes alone cannot fit), and a ``store build`` sequence longer than the context before any pass.
"""

from __future__ import annotations

import time

import pytest
from conftest import TESTBED
from conftest import testbed_model_path as model_folder
from test_reliability_overwrite import make_store

from moecompress.checkpoint.lazy import build_skeleton
from moecompress.cli import main
from moecompress.errors import RecipeError, TaskError, describe_value
from moecompress.evals.taskdefs import resolve_tasks
from moecompress.quantization.stages import check_group_size, widest_input
from moecompress.recipe import load_recipe, parse_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

MX, Q3 = model_folder("moe-ref-mx"), model_folder("moe-ref-q3")
CALIBRATION = f"calibration: {{files: [{TESTBED / 'calib' / 'pycode.jsonl'}], num_samples: 2, seq_len: 16}}\n"
BOMB = "".join(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n" for previous, name in
               zip("abcdefgh", "bcdefghi"))


def one_line(captured) -> str:
    lines = [line for line in captured.err.strip().splitlines() if "━" not in line]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def compress(tmp_path, recipe_text: str, capsys) -> str:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    started = time.perf_counter()
    code = main(["compress", str(MX), "--recipe", str(recipe), "--out", str(tmp_path / "out")])
    assert code == 2 and time.perf_counter() - started < 120
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))
    return one_line(capsys.readouterr())


# ----- group sizes are bounded by the widths they will meet -------------------------------------------------------------
@pytest.mark.parametrize("stage", [
    "{method: rtn, bits: 4, group_size: 1073741824}",
    "{method: gptq, bits: 4, group_size: 1048576}",
    "{method: camera_q, avg_bits: 3, group_size: 65536}",
    "{method: mcmoe_pmq, avg_bits: 3, group_size: 1048576}",
], ids=["rtn", "gptq", "camera_q", "pmq"])
def test_a_group_wider_than_any_matrix_is_refused_before_work(tmp_path, capsys, stage):
    message = compress(tmp_path, CALIBRATION + f"stages: [{stage}]\n", capsys)
    assert "is wider than any matrix this model has (the widest input is 288 columns)" in message


def test_the_bound_is_the_widest_input(testbed):
    skeleton, _ = build_skeleton(MX)
    assert widest_input(skeleton) == 288  # the experts' intermediate size (down_proj's input)
    check_group_size(skeleton, 288, "rtn")
    check_group_size(skeleton, -1, "rtn")
    with pytest.raises(RecipeError, match="up to 288"):
        check_group_size(skeleton, 304, "rtn")


# ----- recipes and task files: bounded YAML, bounded messages ------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + BOMB + "stages: [{method: rtn, bits: *i}]\n",
     "anchors and aliases expand to more than 100000 values"),
    ("stages: &s [*s]\n", "refers to itself"),
    ("stages: " + "[" * 3000 + "]" * 3000 + "\n", "nests its values too deeply"),
], ids=["alias-bomb", "self-reference", "deep-nesting"])
def test_a_hostile_recipe_is_refused_in_no_time(tmp_path, capsys, text, message):
    assert len(text) < 7000  # a few KB
    started = time.perf_counter()
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path / "r.yaml", text))
    assert time.perf_counter() - started < 20
    assert message in compress(tmp_path, text, capsys)


def test_a_recipe_larger_than_any_recipe_is_refused_unread(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as handle:
        handle.truncate(64 << 20)  # sparse: nothing is written
    with pytest.raises(RecipeError, match="a recipe is a short YAML file"):
        load_recipe(path)


@pytest.mark.parametrize("recipe", [
    {"stages": [{"method": "rtn", "bits": "x" * 1_000_000}]},
    {"stages": [{"method": "rtn", "targets": [["nested"] * 1000] * 1000}]},
    {"stages": ["y" * 1_000_000]},
    {"calibration": ["z" * 1_000_000]},
    {"stages": [{"method": "m" * 1_000_000}]},
], ids=["long-string", "big-list", "bad-stage", "bad-calibration", "long-method"])
def test_error_messages_quote_a_short_excerpt_of_a_bad_value(recipe):
    with pytest.raises(RecipeError) as error:
        parse_recipe(recipe)
    assert len(str(error.value)) < 2000


def test_describe_value_never_walks_more_than_it_shows():
    value: list = ["lol"] * 9
    for _ in range(40):  # 9**40 values once expanded
        value = [value] * 9
    started = time.perf_counter()
    text = describe_value(value)
    assert len(text) <= 80 and time.perf_counter() - started < 1


def test_a_task_file_alias_bomb_is_refused(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write(tasks / "bomb.yaml", "task: bomb\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + BOMB)
    with pytest.raises(TaskError, match="expand to more than"):
        resolve_tasks(["tb_arith"], include_path=tasks)


# ----- prompts are bounded by the context --------------------------------------------------------------------------------
@pytest.fixture()
def store_folder(tmp_path, testbed):
    return make_store(testbed).save(tmp_path / "store")


def test_a_megabyte_prompt_is_refused_before_it_is_scored(store_folder, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("All work and no play makes Jack a dull boy. " * 24_000)  # ~1 MB
    started = time.perf_counter()
    assert main(["retrieve", str(Q3), "--store", str(store_folder), "--prompt-file", str(prompt)]) == 2
    assert time.perf_counter() - started < 120
    message = one_line(capsys.readouterr())
    assert "more than fit in the model's context of 2048 tokens" in message and "shorter prompt" in message


def test_a_prompt_of_more_tokens_than_the_context_is_refused(store_folder, capsys):
    words = " ".join(f"w{index}" for index in range(3000))  # few bytes per token: the token count decides
    assert main(["retrieve", str(Q3), "--store", str(store_folder), "--prompt", words]) == 2
    message = one_line(capsys.readouterr())
    assert "tokens; the model's context is 2048 tokens" in message and "at most 2047 tokens" in message


def test_a_prompt_file_beyond_any_context_is_not_read(store_folder, tmp_path, capsys):
    prompt = tmp_path / "huge.txt"
    with prompt.open("wb") as handle:
        handle.truncate(100 << 20)
    assert main(["retrieve", str(Q3), "--store", str(store_folder), "--prompt-file", str(prompt)]) == 2
    assert "far more than any model's context holds" in one_line(capsys.readouterr())


def test_store_build_refuses_sequences_longer_than_the_context(tmp_path, capsys):
    argv = ["store", "build", str(Q3), "--tasks", f"code={TESTBED / 'calib' / 'pycode.jsonl'}", "--seq-len", "4096",
            "--num-samples", "2", "--out", str(tmp_path / "store")]
    assert main(argv) == 2
    assert "--seq-len 4096 exceeds the model's context (2048 tokens)" in one_line(capsys.readouterr())
    assert not (tmp_path / "store").exists()


def _write(path, text):
    path.write_text(text)
    return path
