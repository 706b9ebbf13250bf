"""Runs over several ranks (``moecompress.distributed``, gloo on CPU) equal one process.

* the pieces, in two processes joined by a gloo group: ownership blocks; collectives; every calibration statistic
  collected over 2 ranks (each its own batches) equals the one-process result bit for bit; Hessians reduced to their
  owners; solved experts shared;
* whole runs: ``compress --nproc 2`` (and ``torchrun``) against one process, for a streamed prune + GPTQ recipe and
  an in-memory PMQ + GPTQ recipe on two test-bed models: the same decisions and every tensor bit for bit;
* a failing rank stops the run with one error line naming it, and the run resumes to the same result.

Every process runs one thread: a BLAS splits float32 reductions by thread count, so runs are compared at equal
thread counts (README, "Scale-out").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO_ROOT, TESTBED
from conftest import testbed_model_path as model_folder

from moecompress.distributed import World, backend_for, current_world, rank_device, set_world

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from compare_runs import compare_folder  # noqa: E402

STATISTIC_NAMES = ["expert_token_counts", "expert_token_counts_by_domain", "router_logit_mean", "router_logit_gram",
                   "tcess_markers", "routing_weight_sums_raw", "routing_weight_sums_renorm", "combine_weight_sums",
                   "reap_sums", "ean_sums", "max_abs_expert_output", "topk_weight_ratio_hist",
                   "camera_energy_l2", "camera_energy_max", "expert_input_hessian", "down_proj_hessian_affinity",
                   "shared_input_hessian", "shared_down_hessian", "mean_expert_output_all_tokens", "moe_block_inputs"]


# ----- ownership (no process group) -------------------------------------------------------------------------------
def test_blocks_cover_every_item_once_in_rank_order():
    for size in (1, 2, 3, 8):
        for count in (0, 1, 5, 8, 31):
            blocks = [World(rank=rank, size=size).owned(count) for rank in range(size)]
            assert [index for block in blocks for index in block] == list(range(count))
            assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1
            assert all(World(size=size).owner(index, count) == rank
                       for rank, block in enumerate(blocks) for index in block)


def test_a_world_of_one_returns_its_inputs():
    world = World()
    tensor = torch.arange(4.0)
    assert world.all_reduce_(tensor) is tensor and torch.equal(tensor, torch.arange(4.0))
    assert world.broadcast_object({"a": 1}) == {"a": 1} and world.all_gather_objects(3) == [3]
    assert world.broadcast_tensors([tensor], 0)[0] is tensor
    assert current_world().size == 1


def test_backend_and_rank_device_follow_the_device():
    assert backend_for("cuda:0") == "nccl" and backend_for("cpu") == "gloo" and backend_for(None) == "gloo"
    assert rank_device("cuda", 3, device_count=8) == torch.device("cuda", 3)
    assert rank_device("cpu", 3) == torch.device("cpu") and rank_device(None, 1) is None
    with pytest.raises(ValueError, match="needs its own GPU, but this node has 2"):
        rank_device("cuda", 2, device_count=2)


# ----- the pieces, in two processes -------------------------------------------------------------------------------
def _in_group(rank: int, size: int, store: str, job, results: str) -> None:
    """Process ``rank`` of a gloo group: run ``job(world)`` and save what it returns."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    world = set_world(World(rank=rank, size=size, backend="gloo"))
    try:
        torch.save(job(world), f"{results}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_in_group(job, size: int = 2) -> list:
    folder = Path(tempfile.mkdtemp(prefix="moecompress-group-"))
    try:
        mp.spawn(_in_group, args=(size, str(folder / "store"), job, str(folder)), nprocs=size, join=True)
        return [torch.load(folder / f"{rank}.pt", weights_only=False) for rank in range(size)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _collectives(world):
    total = world.all_reduce_(torch.tensor([world.rank + 1.0], dtype=torch.float64))
    largest = world.all_reduce_(torch.tensor([world.rank * 10]), op="max")
    owned = world.reduce_to_(torch.ones(3), owner=1)
    sent = [torch.arange(6, dtype=torch.int32).reshape(2, 3), torch.tensor([1.5], dtype=torch.bfloat16)]
    received = world.broadcast_tensors(sent if world.rank == 1 else None, source=1)
    return {"total": total, "max": largest, "owned": owned, "received": received,
            "objects": world.all_gather_objects({"rank": world.rank})}


def test_collectives_over_two_ranks():
    first, second = _run_in_group(_collectives)
    for result in (first, second):
        assert float(result["total"]) == 3.0 and int(result["max"]) == 10
        assert [r.dtype for r in result["received"]] == [torch.int32, torch.bfloat16]
        assert torch.equal(result["received"][0], torch.arange(6, dtype=torch.int32).reshape(2, 3))
        assert result["objects"] == [{"rank": 0}, {"rank": 1}]
    assert torch.equal(second["owned"], torch.full((3,), 2.0))  # the owner holds the sum


def _calibration_ids():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, 8000, (12, 24), generator=generator)


def _statistics(world, model: str = "moe-ref-ds"):
    import moecompress.analysis.block_outputs  # noqa: F401  (registers moe_block_inputs)
    from moecompress.calibration import LayerwiseRunner

    runner = LayerwiseRunner.from_source(model_folder(model), dtype=torch.float32)
    options = {"moe_block_inputs": {"max_tokens": 50}}
    return runner.run(_calibration_ids(), STATISTIC_NAMES, options=options, batch_size=2).layers


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def test_every_statistic_over_two_ranks_equals_one_process(testbed, one_thread):
    """Each rank runs 3 of the 6 batches; the combined statistics are one process's, bit for bit (the Hessians'
    float64 sums, the sampled block inputs, maxima, histograms, counts)."""
    single = _statistics(World())
    for ranked in _run_in_group(_statistics):
        assert set(ranked) == set(single)
        for layer in single:
            assert ranked[layer].num_tokens == single[layer].num_tokens
            for name in STATISTIC_NAMES:
                _assert_same(ranked[layer][name], single[layer][name], f"layer {layer} {name}")


def _owned_hessians(world):
    from moecompress.calibration.runner import LayerwiseRunner, LayerReplay
    from moecompress.quantization.ranks import owners

    runner = LayerwiseRunner.from_source(model_folder("moe-ref-q3"), dtype=torch.float32)
    hessians = {}

    def process(layer_index, layer, replay: LayerReplay):
        if layer_index == 1:
            views = replay.views()
            chunk = owners(world, views[0].num_experts)
            statistics = replay.collect(["expert_input_hessian"], {"expert_input_hessian": {}}, hessian_owners=chunk)
            hessians["owners"] = chunk
            hessians["values"] = statistics[layer_index]["expert_input_hessian"]

    runner.sweep(_calibration_ids(), process, batch_size=2)
    return hessians


def test_hessians_reach_their_owners(testbed, one_thread):
    single = _owned_hessians(World())["values"]
    ranked = _run_in_group(_owned_hessians)
    for rank, result in enumerate(ranked):
        mine = [expert for expert, owner in enumerate(result["owners"]) if owner == rank]
        assert mine == list(World(rank=rank, size=2).owned(single.shape[0]))
        assert torch.equal(result["values"][mine], single[mine])


def _shared_experts(world):
    from moecompress.quantization.packing import quantize_rtn
    from moecompress.quantization.ranks import owned_keys, share_solved

    generator = torch.Generator().manual_seed(1)
    weights = {expert: torch.randn(8, 32, generator=generator) for expert in range(5)}
    packed, errors = {}, {}
    for expert in owned_keys(world, list(weights)):
        packed[expert] = quantize_rtn(weights[expert], 3 if expert % 2 else 2, 16, symmetric=expert != 3)
        errors[expert] = float(expert) / 10
    share_solved(world, list(weights), packed, errors)
    return {expert: (p.packed, p.scales, p.zeros, p.bits, errors[expert]) for expert, p in packed.items()}


def test_solved_experts_are_shared_with_every_rank():
    single = _shared_experts(World())
    for ranked in _run_in_group(_shared_experts):
        _assert_same(ranked, single)


# ----- whole runs -------------------------------------------------------------------------------------------------
CALIBRATION = {"files": [str(TESTBED / "calib")], "num_samples": 8, "seq_len": 48, "batch_size": 2}
PRUNE_GPTQ = [{"method": "prune_frequency", "keep_ratio": 0.75}, {"method": "gptq", "bits": 2, "group_size": 32}]
MERGE_REAP_GPTQ = [{"method": "merge_uncurl", "num_experts_to_keep": 28, "router_rule": "collapse"},
                   {"method": "prune_reap", "num_experts_to_keep": 24}, {"method": "gptq", "bits": 3, "group_size": 32}]
PMQ_GPTQ = [{"method": "mcmoe_pmq", "avg_bits": 2.5, "candidates": [2, 3]},
            {"method": "gptq", "bits": 2, "group_size": 32, "agq": True, "targets": ["routed_experts", "attention"]}]


def _write_recipe(folder: Path, stages: list) -> Path:
    import yaml

    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"calibration": CALIBRATION, "stages": stages}))
    return path


def _compress(model: str, recipe: Path, out: Path, *extra: str, first_on_path: Path | None = None,
              env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable, "-m"]), "moecompress", "compress", str(model_folder(model)),
               "--recipe", str(recipe), "--out", str(out), "--threads", "1", *extra]
    path = [str(first_on_path)] if first_on_path else []
    environment = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([*path, str(REPO_ROOT)])}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)


_ONE_PROCESS: dict[tuple, Path] = {}


def _one_process(model: str, stages: list, execution: str, folder: Path) -> Path:
    """The one-process output of ``stages`` on ``model``, made once per test session (the reference of several
    tests)."""
    key = (model, json.dumps(stages, sort_keys=True), execution)
    if key not in _ONE_PROCESS:
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "one"
        result = _compress(model, _write_recipe(folder, stages), out, "--execution", execution)
        assert result.returncode == 0, result.stderr[-3000:]
        _ONE_PROCESS[key] = out
    return _ONE_PROCESS[key]


def _assert_equal_runs(one: Path, ranked: Path) -> None:
    problems, count = compare_folder(one, ranked)
    assert count > 0 and problems == [], problems
    report = json.loads((ranked / "report.json").read_text())
    assert report["ranks"]["world_size"] == 2 and len(report["ranks"]["peak_memory_bytes"]) == 2
    assert json.loads((one / "report.json").read_text())["ranks"]["world_size"] == 1


@pytest.mark.parametrize("model,stages,execution", [
    pytest.param("moe-ref-q3", PRUNE_GPTQ, "streamed", id="q3-prune-gptq-streamed"),
    pytest.param("moe-ref-ds", PMQ_GPTQ, "in_memory", id="ds-pmq-agq-gptq"),
    pytest.param("moe-ref-mx", PRUNE_GPTQ, "streamed", id="mx-prune-gptq-streamed", marks=pytest.mark.slow),
    pytest.param("moe-ref-mx", PMQ_GPTQ, "in_memory", id="mx-pmq-agq-gptq", marks=pytest.mark.slow),
    pytest.param("moe-ref-q3", MERGE_REAP_GPTQ, "in_memory", id="q3-merge-reap-gptq", marks=pytest.mark.slow),
])
def test_two_ranks_equal_one_process(testbed, tmp_path, tmp_path_factory, model, stages, execution):
    one = _one_process(model, stages, execution, tmp_path_factory.mktemp("one"))
    two = _compress(model, _write_recipe(tmp_path, stages), tmp_path / "two", "--execution", execution,
                    "--nproc", "2", "--log-dir", str(tmp_path / "logs"))
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_equal_runs(one, tmp_path / "two")
    assert "[rank1]:" in two.stderr  # every rank's lines reach the terminal, prefixed
    assert list((tmp_path / "logs").rglob("stderr.log"))  # and a log file per rank


@pytest.mark.slow
def test_torchrun_launch_equals_one_process(testbed, tmp_path, tmp_path_factory):
    one = _one_process("moe-ref-q3", PRUNE_GPTQ, "streamed", tmp_path_factory.mktemp("one"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    two = _compress("moe-ref-q3", _write_recipe(tmp_path, PRUNE_GPTQ), tmp_path / "two", launcher=torchrun)
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_equal_runs(one, tmp_path / "two")


FAILING_RANK = '''
import os
if os.environ.get("RANK") == "1" and os.environ.get("MOECOMPRESS_TEST_FAIL"):
    from moecompress.errors import MoECompressError
    from moecompress.quantization import sequential

    original = sequential._GPTQLayer.run

    def run(self):
        if self.layer_index == 3:
            raise MoECompressError("injected failure in layer 3")
        return original(self)

    sequential._GPTQLayer.run = run
'''


def test_a_failing_rank_stops_the_run_with_one_error_and_the_run_resumes(testbed, tmp_path, tmp_path_factory):
    """Rank 1 fails in layer 3 (a ``sitecustomize`` patch in every rank): the command exits with that rank's code and
    one last line naming rank 1 and its message; the layers staged before it are kept, and the same command then
    resumes and finishes with the result of one process."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FAILING_RANK)
    recipe = _write_recipe(tmp_path, PRUNE_GPTQ)
    out = tmp_path / "two"
    failed = _compress("moe-ref-q3", recipe, out, "--nproc", "2", first_on_path=hooks,
                       env={"MOECOMPRESS_TEST_FAIL": "1"})
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("moecompress compress: error: rank 1 of 2 failed: injected failure in layer 3"), last
    assert "re-run the same command to resume" in last
    partials = list(tmp_path.glob("two.partial-*"))
    assert len(partials) == 1 and not out.exists()
    staged = sorted(path.name for path in (partials[0] / ".stream-layers").glob("layer-*.json"))
    assert staged == ["layer-00000.json", "layer-00001.json", "layer-00002.json"]

    resumed = _compress("moe-ref-q3", recipe, out, "--nproc", "2", first_on_path=hooks)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_equal_runs(_one_process("moe-ref-q3", PRUNE_GPTQ, "streamed", tmp_path_factory.mktemp("one")), out)


def test_a_recipe_with_a_stage_not_checked_over_ranks_is_refused(testbed, tmp_path):
    recipe = _write_recipe(tmp_path, [{"method": "camera_p", "ratio": 0.5}])
    result = _compress("moe-ref-q3", recipe, tmp_path / "out", "--nproc", "2")
    assert result.returncode == 2
    assert "cannot run over several ranks yet" in result.stderr.strip().splitlines()[-1]
