"""Clean exits (issue 8, section 4): one line on stderr and a known exit code for every class of failure a user can
cause, in every command. Argument errors: 2. moecompress errors: 2. Ctrl-C: 130 (saying whether the run resumes).
The machine refusing (memory, disk, permissions): 1. A bug keeps its traceback."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from conftest import testbed_model_path as model_folder

from moecompress.cli import main
from moecompress.commands.arguments import check_device
from moecompress.pipeline import _PipelineRun
from moecompress.progress import is_status_line

MODEL = str(model_folder("moe-ref-mx"))


def _one_line(captured) -> str:
    """The one message line on stderr (progress bars and status lines before a failure are not error messages)."""
    lines = [line for line in captured.err.strip().splitlines() if "━" not in line and not is_status_line(line)]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and "usage:" not in captured.err
    return lines[0]


@pytest.fixture()
def recipe(tmp_path, testbed):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"calibration: {{files: [{testbed / 'calib' / 'pycode.jsonl'}], num_samples: 4, seq_len: 16}}\n"
                    "stages: []\n")
    return path


def _compress(recipe, tmp_path, *extra):
    return ["compress", MODEL, "--recipe", str(recipe), "--out", str(tmp_path / "out"), *extra]


# ----- argument errors: exit 2, one line -----------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--threads", "0"], "argument --threads: expected a whole number >= 1, got '0'"),
    (["--threads", "-3"], "argument --threads: expected a whole number >= 1"),
    (["--threads", "many"], "argument --threads: expected a whole number >= 1, got 'many'"),
    (["--device", "banana"], "argument --device: 'banana' is not a torch device"),
    (["--device", "meta"], "argument --device: --device meta: moecompress runs on cpu, cuda or mps"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--colour", "red"], "unrecognized arguments: --colour red"),
], ids=["threads-zero", "threads-negative", "threads-text", "device-garbage", "device-unsupported", "dtype", "unknown"])
def test_compress_argument_errors(recipe, tmp_path, capsys, extra, message):
    assert main(_compress(recipe, tmp_path, *extra)) == 2
    assert message in _one_line(capsys.readouterr())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got '0'"),
    (["--batch-size", "lots"], "argument --batch-size: expected a whole number >= 1, got 'lots'"),
    (["--limit", "-1"], "argument --limit: --limit must be positive"),
    (["--limit", "some"], "argument --limit: expected a number of documents or a fraction < 1, got 'some'"),
    (["--limit", "inf"], "argument --limit: --limit must be positive and finite"),
], ids=["batch-zero", "batch-text", "limit-negative", "limit-text", "limit-infinite"])
def test_eval_argument_errors(capsys, extra, message):
    assert main(["eval", MODEL, "--tasks", "tb_arith", *extra]) == 2
    assert message in _one_line(capsys.readouterr())


def test_missing_arguments_and_no_command(capsys):
    assert main(["compress", MODEL]) == 2
    assert "the following arguments are required: --recipe, --out" in _one_line(capsys.readouterr())
    assert main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in _one_line(capsys.readouterr())
    assert main(["--version"]) == 0


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_cuda_device_without_cuda_is_one_line(recipe, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = _compress(recipe, tmp_path) if command == "compress" else ["eval", MODEL, "--tasks", "tb_arith"]
    assert main([*argv, "--device", "cuda"]) == 2
    err = _one_line(capsys.readouterr())
    assert "argument --device: --device cuda:" in err and "use --device cpu" in err


def test_cuda_index_beyond_the_machine_is_one_line(recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main([*_compress(recipe, tmp_path), "--device", "cuda:5"]) == 2
    assert "this machine has 2 CUDA device(s) (cuda:0..cuda:1)" in _one_line(capsys.readouterr())


# ----- Ctrl-C: exit 130, one line, says whether the run resumes --------------------------------------------------------
def test_ctrl_c_in_compress_before_any_saved_work(recipe, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_PipelineRun, "_profile", interrupted)
    assert main(_compress(recipe, tmp_path)) == 130
    err = _one_line(capsys.readouterr())
    assert err.startswith("moecompress compress: interrupted; stopped before any work was saved")
    assert not list(tmp_path.glob("out*"))


def test_ctrl_c_in_compress_after_the_profile_says_it_resumes(tmp_path, testbed, capsys, monkeypatch):
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(f"calibration: {{files: [{testbed / 'calib' / 'pycode.jsonl'}], num_samples: 4, seq_len: 16}}\n"
                      "stages: [{method: prune_frequency, num_experts_to_keep: 6}]\n")
    from moecompress.pruning.frequency import FrequencyPruning

    def interrupted(self, context):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(FrequencyPruning, "run", interrupted)
        assert main(_compress(recipe, tmp_path, "--threads", "1")) == 130
    err = _one_line(capsys.readouterr())
    assert "interrupted; the run can be resumed: re-run the same command" in err and ".partial-" in err
    assert main(_compress(recipe, tmp_path, "--threads", "1")) == 0  # and it does resume
    assert sorted((tmp_path / "out").glob("model*.safetensors"))  # the pruned model was written


@pytest.mark.parametrize("command", ["inspect", "eval"])
def test_ctrl_c_in_other_commands(capsys, monkeypatch, command):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if command == "inspect":
        from moecompress.commands import inspect

        monkeypatch.setattr(inspect, "inspect_checkpoint", interrupted)
        argv = ["inspect", MODEL]
    else:
        from moecompress.commands import eval as eval_command

        monkeypatch.setattr(eval_command, "evaluate_model", interrupted)
        argv = ["eval", MODEL, "--tasks", "tb_arith", "--limit", "2"]
    assert main(argv) == 130
    assert _one_line(capsys.readouterr()) == f"moecompress {command}: interrupted"


# ----- the machine refuses: exit 1, one line; a bug keeps its traceback ------------------------------------------------
@pytest.mark.parametrize("failure, message", [
    (MemoryError(), "out of memory (MemoryError); use a smaller batch size"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail"),
     "out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); use a smaller batch size"),
    (OSError(errno.ENOSPC, "No space left on device"), "error: no space left on the device while writing "),
    (PermissionError(errno.EACCES, "Permission denied", "/out"), "error: [Errno 13] Permission denied: '/out'"),
], ids=["memory", "gpu-memory", "disk-full", "permission"])
def test_machine_refusals_are_one_line_exit_1(recipe, tmp_path, capsys, monkeypatch, failure, message):
    def refuse(*args, **kwargs):
        raise failure

    monkeypatch.setattr(_PipelineRun, "_profile", refuse)
    assert main(_compress(recipe, tmp_path)) == 1
    assert message in _one_line(capsys.readouterr())


def test_a_bug_keeps_its_traceback(recipe, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(_PipelineRun, "_profile", bug)
    with pytest.raises(ZeroDivisionError):
        main(_compress(recipe, tmp_path))


def test_check_device_accepts_what_the_machine_has():
    assert check_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert check_device("cuda:0") == "cuda:0"


# ----- a real process: the console entry point, a real SIGINT ------------------------------------------------------------
@pytest.mark.slow
def test_real_process_argument_error_and_sigint(recipe, tmp_path, testbed):
    import os
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "moecompress.cli", *_compress(recipe, tmp_path, "--threads", "x")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr

    slow_recipe = tmp_path / "slow.yaml"
    slow_recipe.write_text(f"calibration: {{files: [{testbed / 'calib'}], num_samples: 256, seq_len: 256}}\n"
                           "stages: []\n")
    # SIGINT as a terminal delivers it, even when this test runs in the background (where SIGINT is ignored and
    # the child would inherit that)
    process = subprocess.Popen([sys.executable, "-m", "moecompress.cli", *_compress(slow_recipe, tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not list(tmp_path.glob("out.partial-*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)  # the partial folder appears when the profiling pass starts
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip() and "━" not in line and not is_status_line(line)]
    assert lines == [lines[-1]] and lines[-1].startswith("moecompress compress: interrupted"), err
    assert "Traceback" not in err
