"""What a newcomer hit (issue 25): a hub evaluation task while offline fails before any work, every recipe's
example command names a model that exists, and ``files: bundled`` works from an installed wheel, not only from a
source checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
from conftest import REPO_ROOT
from conftest import testbed_model_path as model_folder

from moecompress.cli import main
from moecompress.pipeline import _PipelineRun
from moecompress.progress import is_status_line
from moecompress.recipe import load_recipe


def test_an_offline_hub_task_fails_before_profiling(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def profiled(*args, **kwargs):
        raise AssertionError("the profiling pass ran")

    monkeypatch.setattr(_PipelineRun, "_profile", profiled)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("calibration: {files: bundled, num_samples: 4, seq_len: 32}\n"
                      "stages: [{method: prune_frequency, keep_ratio: 0.75}, {method: evaluate, tasks: [hellaswag]}]\n")
    started = time.perf_counter()
    code = main(["compress", str(model_folder("moe-ref-mx")), "--recipe", str(recipe), "--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if not is_status_line(line)]
    assert code == 2 and len(err) == 1, err
    assert "offline mode is on" in err[0] and "hellaswag needs Rowan/hellaswag" in err[0]
    assert not list(tmp_path.glob("out*"))  # no partial folder left behind
    assert time.perf_counter() - started < 120


def test_every_recipes_example_command_names_a_model_that_exists():
    for recipe in sorted((REPO_ROOT / "recipes").glob("*.yaml")):
        load_recipe(recipe)  # and it parses
        for model in re.findall(r"moecompress compress (\S+) --recipe", recipe.read_text()):
            assert (REPO_ROOT / model).is_dir() or model.startswith(("MODEL", "Qwen/", "path/")), (recipe.name, model)


@pytest.mark.timeout(600)
def test_a_wheel_install_has_the_bundled_calibration_and_tasks(tmp_path):
    """Build the wheel, install it (without dependencies: they are this venv's) into a folder of its own, and
    calibrate with ``files: bundled`` from outside the source tree."""
    source = tmp_path / "source"  # a copy, so the build writes nothing into the checkout
    shutil.copytree(REPO_ROOT / "moecompress", source / "moecompress", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(source)], capture_output=True, text=True, timeout=500)
    assert build.returncode == 0, build.stderr
    wheel = next(wheels.glob("moecompress-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "moecompress/data/calib/pycode.jsonl" in names and "moecompress/evals/tasks/tb_arith.yaml" in names
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    code = f"""
import moecompress
from transformers import AutoTokenizer
from moecompress.calibration import load_calibration
from moecompress.calibration.data import bundled_calibration_dir
calibration = load_calibration(AutoTokenizer.from_pretrained({str(model_folder('moe-ref-q3'))!r}), files="bundled",
                               num_samples=8, seq_len=64)
print(moecompress.__file__)
print(bundled_calibration_dir())
print(len(set(calibration.domains)))
"""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["PYTHONPATH"] = str(site)  # the wheel's copy, not the checkout (run from elsewhere)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=environment)
    assert done.returncode == 0, done.stderr
    package_file, calibration_dir, domains = done.stdout.split()
    assert package_file.startswith(str(site)) and calibration_dir.startswith(str(site))
    assert int(domains) == 8
