"""What a user sees (issue 25): only our lines on the terminal, progress per layer with rates and time left, results
on stdout and everything else on stderr, the libraries' own output only when verbose, and ``run.log`` in every run
folder (kept in the partial folder on failure and named in the error).

The two subprocess tests run the real console entry point, as a user does, and check every line it prints."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
import warnings

import pytest
from conftest import REPO_ROOT
from conftest import testbed_model_path as model_folder

from moecompress import progress
from moecompress.commands.compress import summary_lines
from moecompress.logs import LOGGER, RUN_LOG, ConsoleHandler, RunLog, run_output
from moecompress.progress import ProgressReporter, RichProgress, TextProgress, for_stream, is_status_line

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    return fake


# ----- progress: numbers and plain lines --------------------------------------------------------------------------
def test_plain_lines_one_per_layer_and_the_rest_at_an_interval(clock):
    stream = io.StringIO()
    reporter = TextProgress(stream, interval=5)
    reporter.start("stage 3/4 gptq", 3, unit="layer")
    clock.now += 2
    reporter.detail("stage 3/4 gptq", 12, 24, "experts down")  # 2 s in: within the interval, nothing printed
    assert stream.getvalue() == ""
    clock.now += 2
    reporter.update("stage 3/4 gptq", 1, 3)  # a finished layer: always a line
    assert stream.getvalue() == "[0:04] stage 3/4 gptq: 1/3 layers · 4.0 s/layer · ~8 s left\n"
    clock.now += 6
    reporter.detail("stage 3/4 gptq", 12, 24, "experts down")  # 6 s since the last line: a line with the detail
    assert stream.getvalue().splitlines()[-1] == ("[0:10] stage 3/4 gptq: 1/3 layers · experts down 12/24 · "
                                                  "4.0 s/layer · ~4 s left")
    clock.now += 1
    reporter.update("stage 3/4 gptq", 2, 3)
    assert stream.getvalue().splitlines()[-1] == "[0:11] stage 3/4 gptq: 2/3 layers · 5.5 s/layer · ~6 s left"
    clock.now += 5
    reporter.update("stage 3/4 gptq", 3, 3)  # the last layer: the done line says it
    reporter.finish("stage 3/4 gptq")
    assert stream.getvalue().splitlines()[-1] == "[0:16] stage 3/4 gptq: done in 16 s · 3 layers, 5.3 s/layer"
    assert len(stream.getvalue().splitlines()) == 4
    reporter.start("evaluate original model", 100, unit="request")
    clock.now += 1
    reporter.update("evaluate original model", 10)  # requests: at the interval only
    clock.now += 5
    reporter.update("evaluate original model", 60)
    assert stream.getvalue().splitlines()[-1] == ("[0:22] evaluate original model: 60/100 requests · "
                                                  "10 requests/s · ~4 s left")
    assert len(stream.getvalue().splitlines()) == 5
    assert all(is_status_line(line) for line in stream.getvalue().splitlines())


def test_fast_steps_show_a_rate_per_second_and_a_second_pass_restarts_the_estimate(clock):
    reporter = ProgressReporter()
    reporter.start("evaluate", 100, unit="request")
    clock.now += 2
    reporter.update("evaluate", 50)
    task = reporter.tasks["evaluate"]
    assert task.rate() == "25 requests/s" and task.seconds_left() == pytest.approx(2.0)
    clock.now += 1
    reporter.update("evaluate", 10)  # the count went down: a second pass over the steps
    assert task.passes == 2
    clock.now += 1
    reporter.update("evaluate", 20)
    assert task.seconds_per_step() == pytest.approx(0.1)  # measured from the start of the second pass only
    reporter.finish("evaluate")
    assert "2 passes" in task.done_line()


def test_every_finished_step_is_logged_with_its_time(clock, caplog):
    reporter = ProgressReporter()
    with caplog.at_level(logging.DEBUG, logger="moecompress.progress"):
        reporter.start("profile", 2, unit="layer")
        clock.now += 1.5
        reporter.update("profile", 1)
        clock.now += 0.5
        reporter.update("profile", 2)
        reporter.finish("profile")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["profile: layer 1/2 in 1.5 s", "profile: layer 2/2 in 0.50 s",
                        "profile: done in 2.0 s · 2 layers, 1.0 s/layer"]


def test_deep_code_reports_to_the_innermost_task_and_a_failed_task_is_not_done(clock):
    stream = io.StringIO()
    reporter = TextProgress(stream, interval=0)
    progress.advance()  # no run in progress: nothing happens
    with progress.reporting(reporter):
        reporter.start("stage 1/1 evaluate", None, unit="layer")
        with progress.task("evaluate original model", unit="request"):
            progress.add_total(8)
            progress.advance(3)
            assert reporter.tasks["evaluate original model"].completed == 3
            assert reporter.tasks["evaluate original model"].total == 8
        with pytest.raises(KeyboardInterrupt), progress.task("evaluate compressed model", unit="request"):
            raise KeyboardInterrupt
    assert "evaluate original model: done" in stream.getvalue()
    assert "evaluate compressed model: done" not in stream.getvalue()


def test_a_terminal_gets_bars_and_anything_else_plain_lines(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TERM", raising=False)
    assert isinstance(for_stream(Terminal()), RichProgress)
    assert isinstance(for_stream(io.StringIO()), TextProgress)
    monkeypatch.setenv("TERM", "dumb")
    assert isinstance(for_stream(Terminal()), TextProgress)


# ----- logging: our console lines, libraries into run.log -------------------------------------------------------
def test_libraries_and_warnings_go_to_the_run_log_not_the_console(tmp_path):
    console_stream = io.StringIO()
    run_log = RunLog()
    library = logging.getLogger("transformers")
    own_handler = logging.StreamHandler(io.StringIO())
    library.addHandler(own_handler)
    try:
        with run_output(run_log, console=ConsoleHandler(console_stream), verbose=False):
            LOGGER.info("ours, before the folder exists")
            run_log.open(tmp_path)
            LOGGER.debug("debug detail")
            library.warning("a library warning")
            warnings.warn("a python warning", UserWarning, stacklevel=1)
            logging.getLogger("lm_eval.models.huggingface").warning("lm-eval's warning")  # no handler: the root
        assert library.handlers[-1] is own_handler and not logging.getLogger("py.warnings").handlers  # put back
    finally:
        library.removeHandler(own_handler)
        run_log.close()
    console = console_stream.getvalue().splitlines()
    assert len(console) == 1 and console[0].endswith("ours, before the folder exists") and is_status_line(console[0])
    assert own_handler.stream.getvalue() == ""
    text = (tmp_path / RUN_LOG).read_text()
    for expected in ("ours, before the folder exists", "DEBUG   moecompress: debug detail", "a library warning",
                     "UserWarning: a python warning", "lm-eval's warning"):
        assert expected in text, expected
    assert text.count("a library warning") == 1  # not repeated by the root logger


# ----- the real command line ----------------------------------------------------------------------------------
def _run_cli(args, tmp_path, **env):
    environment = dict(os.environ)
    for name in ("MOECOMPRESS_VERBOSE", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS",
                 "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        environment.pop(name, None)  # as a user's shell has them: the CLI must switch the bars off itself
    environment.update({"PYTHONPATH": str(REPO_ROOT), "COLUMNS": "40", **env})
    return subprocess.run([sys.executable, "-m", "moecompress.cli", *args], capture_output=True, text=True,
                          env=environment, cwd=tmp_path, timeout=900)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, testbed):
    """One real ``compress`` run: pruning, GPTQ, evaluation on a multiple-choice and a perplexity task, and a
    compressed-tensors export (its "load with" lines)."""
    tmp_path = tmp_path_factory.mktemp("cli")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
calibration: {{files: [{testbed / 'calib'}], num_samples: 8, seq_len: 64}}
stages:
  - {{method: prune_reap, num_experts_to_keep: 24}}
  - {{method: gptq, bits: 4, group_size: 16}}
  - {{method: evaluate, tasks: [tb_arith, tb_ppl_pycode], limit: 6, batch_size: 8}}
export: compressed-tensors
""")
    out = tmp_path / "out"
    done = _run_cli(["compress", str(model_folder("moe-ref-q3")), "--recipe", str(recipe), "--out", str(out),
                     "--threads", "1"], tmp_path, MOECOMPRESS_PROGRESS_INTERVAL="0")
    assert done.returncode == 0, done.stderr
    return done, out


def test_compress_prints_only_our_lines_results_on_stdout(compressed):
    done, out = compressed
    report = json.loads((out / "report.json").read_text())
    report["exports"] = [json.loads((out.parent / "out-compressed-tensors" / "export_report.json").read_text())]
    assert done.stdout.splitlines() == summary_lines(report, out)  # stdout: the summary, nothing else
    err = done.stderr.splitlines()
    foreign = [line for line in err if not is_status_line(line)]
    assert not foreign, "lines on stderr that are not ours:\n" + "\n".join(foreign)
    # progress per layer, with rates and time left; GPTQ reports the experts of a layer; evaluation its requests
    assert any("gptq" in line and "/6 layers" in line and "s/layer" in line and "left" in line for line in err)
    assert any("experts gate/up" in line or "experts down" in line for line in err)
    assert any("evaluate original model:" in line and "requests" in line for line in err)
    assert any(line.endswith(f"done: {out} (report.md, README.md, run.log) in {line.rsplit(' ', 2)[-2]} s")
               for line in err)


def test_commands_for_the_user_are_never_wrapped(compressed):
    done, out = compressed
    load = json.loads((out.parent / "out-compressed-tensors" / "export_report.json").read_text())["load"]
    for command in load.values():  # COLUMNS=40: each command still on one line, whole
        assert any(line.strip().endswith(command) for line in done.stdout.splitlines()), command


def test_run_log_holds_versions_layer_timings_and_the_library_warnings(compressed):
    done, out = compressed
    text = (out / RUN_LOG).read_text()
    assert "versions: moecompress" in text and "torch threads 1" in text and "device cpu" in text
    for layer in range(1, 7):
        assert f"profile: layer {layer}/6 in " in text
        assert f"gptq, streamed: layer {layer}/6 in " in text
    assert "`pretrained` model kwarg is not of type `str`" in text  # lm-eval's warning: here, not on the terminal
    assert "`pretrained` model kwarg" not in done.stderr
    summary_start = text.index("compress ")
    assert text.index("done: ") > summary_start
    state = json.loads((out / "state.json").read_text())
    assert RUN_LOG not in state["files"] and "README.md" in state["files"]  # the log may grow; the card is checked


def test_eval_quiet_and_verbose(tmp_path, testbed):
    args = ["eval", str(model_folder("moe-ref-mx")), "--tasks", "tb_arith", "--limit", "4", "--json"]
    quiet = _run_cli(args, tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert set(json.loads(quiet.stdout)) == {"tb_arith"}  # stdout: only the JSON
    assert all(is_status_line(line) for line in quiet.stderr.splitlines()), quiet.stderr
    assert "evaluate" in quiet.stderr and "requests" in quiet.stderr
    verbose = _run_cli(args, tmp_path, MOECOMPRESS_VERBOSE="1")
    assert verbose.returncode == 0, verbose.stderr
    assert json.loads(verbose.stdout) == json.loads(quiet.stdout)
    assert "`pretrained` model kwarg is not of type `str`" in verbose.stderr  # the libraries' own output is back
    assert "`pretrained` model kwarg" not in quiet.stderr


# ----- failure: the log is kept and named ------------------------------------------------------------------------
def test_a_failed_run_keeps_its_log_in_the_partial_folder_and_names_it(tmp_path, testbed, monkeypatch, capsys):
    from moecompress.cli import main
    from moecompress.errors import RecipeError
    from moecompress.pruning.frequency import PruneFrequencyStage

    def refuse(self, context):
        raise RecipeError("prune_frequency: something impossible")

    monkeypatch.setattr(PruneFrequencyStage, "run", refuse)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"calibration: {{files: [{testbed / 'calib'}], num_samples: 4, seq_len: 32}}\n"
                      "stages: [{method: prune_frequency, keep_ratio: 0.75}]\n")
    started = time.time()
    assert main(["compress", str(model_folder("moe-ref-mx")), "--recipe", str(recipe), "--out",
                 str(tmp_path / "out")]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if not is_status_line(line)]
    assert len(error) == 1 and "something impossible (log: " in error[0]
    log = error[0].rsplit("(log: ", 1)[1].rstrip(")")
    assert ".partial-" in log and log.endswith(RUN_LOG)
    text = open(log).read()
    assert "the run stopped: prune_frequency: something impossible" in text and "Traceback" in text
    assert "profile: layer 6/6" in text and os.path.getmtime(log) >= started - 1
