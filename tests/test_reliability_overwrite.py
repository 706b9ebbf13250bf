"""``--overwrite`` outside ``compress`` (issue 26, class 1): every command that writes a folder follows compress's rules.

``store build`` and ``retrieve`` never write into, or replace, one of their inputs (the model, the store being read,
the task texts, the prompt file), and ``--overwrite`` replaces only a folder the same command wrote (a pattern store;
a reduced model whose ``retrieval.json`` lists its files) holding nothing else: a folder of the user's files, or a
store with a file of the user's beside it, is refused on one line and left exactly as it was.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TESTBED
from conftest import testbed_model_path as model_folder

from moecompress.checkpoint.fingerprint import routing_fingerprint
from moecompress.cli import main
from moecompress.errors import RetrievalError
from moecompress.pruning.retrieval import PatternStore, TcessOptions

pytestmark = pytest.mark.usefixtures("one_thread")

Q3 = model_folder("moe-ref-q3")
CALIB = TESTBED / "calib"


def make_store(testbed) -> PatternStore:
    """A store for moe-ref-q3 with made-up patterns (retrieval works on it; no calibration pass needed)."""
    generator = torch.Generator().manual_seed(0)
    return PatternStore(
        patterns={task: torch.rand(6, 32, generator=generator) for task in ("code", "prose")},
        moe_layers=list(range(6)), fingerprint=routing_fingerprint(Q3), tcess=TcessOptions.preset("recommended"),
        key_layers=[0], tasks={task: {"files": ["x.jsonl"], "num_tokens": 64, "calibration_sha256": "0"}
                               for task in ("code", "prose")}, model_top_k=4)


def snapshot(folder):
    """Every file under ``folder`` with its bytes (what 'left exactly as it was' compares)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def run_cli(argv, capsys):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def user_folder(tmp_path):
    folder = tmp_path / "my-files"
    (folder / "notes").mkdir(parents=True)
    (folder / "thesis.tex").write_text("three years of work")
    (folder / "notes" / "todo.txt").write_text("back up")
    return folder


@pytest.fixture()
def saved_store(tmp_path, testbed):
    return make_store(testbed).save(tmp_path / "store")


def _retrieve(store, out, *extra):
    return ["retrieve", Q3, "--store", store, "--prompt", "def main(argv):", "--keep", "8", "--dtype", "float32",
            "--out", out, *extra]


def _build(out, *extra, tasks=(f"code={CALIB / 'pycode.jsonl'}",)):
    return ["store", "build", Q3, "--tasks", *tasks, "--num-samples", "2", "--seq-len", "16", "--out", out, *extra]


# ----- a folder of the user's files is never replaced ----------------------------------------------------------------
@pytest.mark.parametrize("command", ["retrieve", "store build"])
def test_overwrite_never_replaces_a_folder_of_other_files(command, user_folder, saved_store, capsys):
    before = snapshot(user_folder)
    argv = _retrieve(saved_store, user_folder, "--overwrite") if command == "retrieve" else \
        _build(user_folder, "--overwrite")
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    message = one_line(err)
    assert f"--out {user_folder}" in message and "thesis.tex" in message and "replaces only a" in message
    assert snapshot(user_folder) == before


@pytest.mark.parametrize("command", ["retrieve", "store build"])
def test_without_overwrite_a_non_empty_folder_is_refused(command, user_folder, saved_store, capsys):
    before = snapshot(user_folder)
    argv = _retrieve(saved_store, user_folder) if command == "retrieve" else _build(user_folder)
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "is not empty; pass --overwrite" in one_line(err)
    assert snapshot(user_folder) == before


# ----- an input is never the output ------------------------------------------------------------------------------
@pytest.mark.parametrize("where, label", [
    ("{store}", "pattern store"),                 # the very store being read
    ("{store}/sub", "pattern store"),            # inside it
    ("{store_parent}", "pattern store"),         # around it
    ("{prompt_parent}", "prompt file"),          # around the prompt file
])
def test_retrieve_never_writes_into_or_over_an_input(where, label, saved_store, tmp_path, capsys):
    prompt_folder = tmp_path / "prompts"
    prompt_folder.mkdir()
    (prompt_folder / "p.txt").write_text("def main(argv):")
    out = where.format(store=saved_store, store_parent=saved_store.parent, prompt_parent=prompt_folder)
    before = snapshot(saved_store)
    code, _, err = run_cli(["retrieve", Q3, "--store", saved_store, "--prompt-file", prompt_folder / "p.txt",
                            "--keep", "8", "--out", out, "--overwrite"], capsys)
    assert code == 2 and label in one_line(err)
    assert snapshot(saved_store) == before and (prompt_folder / "p.txt").read_text() == "def main(argv):"


@pytest.mark.parametrize("where, label", [
    ("{calib}", "text of task code"),            # the folder of a task's text
    ("{model}", "input model folder"),
    ("{model}/store", "input model folder"),
])
def test_store_build_never_writes_into_or_over_an_input(where, label, tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "code.jsonl").write_text((CALIB / "pycode.jsonl").read_text())
    out = where.format(calib=calib, model=Q3)
    code, _, err = run_cli(_build(out, "--overwrite", tasks=[f"code={calib / 'code.jsonl'}"]), capsys)
    assert code == 2 and label in one_line(err)
    assert (calib / "code.jsonl").read_text() == (CALIB / "pycode.jsonl").read_text()
    assert not (Q3 / "store").exists()


# ----- what the command wrote itself is replaced, and only that --------------------------------------------------------
def test_overwrite_replaces_a_store_but_not_one_holding_a_users_file(saved_store, testbed):
    store = make_store(testbed)
    store.patterns["code"] = store.patterns["code"] * 0.5
    store.save(saved_store, overwrite=True)  # a store moecompress wrote: replaced
    assert torch.equal(PatternStore.load(saved_store).patterns["code"], store.patterns["code"])
    (saved_store / "README.md").write_text("my notes about this store")
    with pytest.raises(RetrievalError, match=r"files it did not write \(README.md\)"):
        store.save(saved_store, overwrite=True)
    assert (saved_store / "README.md").read_text() == "my notes about this store"
    assert sorted(path.name for path in saved_store.parent.iterdir()) == ["store"]  # no partial folder left


def test_overwrite_replaces_an_earlier_reduced_model_but_not_one_holding_a_users_file(saved_store, tmp_path, capsys):
    out = tmp_path / "reduced"
    code, _, err = run_cli(_retrieve(saved_store, out), capsys)
    assert code == 0, err
    record = json.loads((out / "retrieval.json").read_text())
    assert "config.json" in record["files"] and "retrieval.json" in record["files"]
    code, _, err = run_cli(_retrieve(saved_store, out, "--overwrite"), capsys)
    assert code == 0, err  # its own earlier output: replaced
    (out / "eval-results.csv").write_text("my numbers")
    code, _, err = run_cli(_retrieve(saved_store, out, "--overwrite"), capsys)
    assert code == 2 and "eval-results.csv" in one_line(err)
    assert (out / "eval-results.csv").read_text() == "my numbers"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["reduced", "store"]  # no work folder left
