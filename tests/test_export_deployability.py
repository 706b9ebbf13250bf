"""The deployability check: each case vLLM cannot serve is refused before anything is written, with one line naming
the reason and the recipe option that fixes it."""

from __future__ import annotations

import json

import pytest
from export_helpers import native_folder

from moecompress.checkpoint.native_reader import NativeCheckpoint
from moecompress.export import export_folder
from moecompress.export.deployability import NotDeployableError, deployability_problems

pytestmark = pytest.mark.usefixtures("one_thread")


def _variable_width(folder):
    """CAMERA-P physical pruning records per-expert widths in config.moecompress["variable_width"]."""
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("moecompress", {})["variable_width"] = {"0": {"expert_widths": [288] * 7 + [256]}}
    (folder / "config.json").write_text(json.dumps(config))


CASES = {
    # case: (native folder options, edit, export options, the message's fix)
    "mixed_widths": (dict(bit_map=lambda layer, expert: (2, 4)[expert % 2]), None, {},
                     "quantize with `granularity: layer`, or export with --widen-to-layer-max"),
    "expert_counts": (dict(keep=lambda views: {views[0].layer_index: list(range(6))}), None, {},
                      "prune with `layer_budget: uniform`"),
    "variable_width": (dict(), _variable_width, {}, "re-run camera_p with `pad_to: 64`"),
    "asymmetric_low_bit": (dict(bits=3, symmetric=False), None, {}, "quantize with `symmetric: true`"),
    "group_size": (dict(group_size=32), None, {"tp": 2}, "quantize with a `group_size` dividing 144 (e.g. 16)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_cases_name_the_fix(tmp_path, case):
    options, edit, export_options, fix = CASES[case]
    native = native_folder(tmp_path, "moe-ref-mx", **options)
    if edit:
        edit(native)
    before = sorted(path.name for path in native.iterdir())
    with pytest.raises(NotDeployableError) as refused:
        export_folder(native, tmp_path / "out", "compressed-tensors", **export_options)
    message = str(refused.value)
    assert "\n" not in message and fix in message
    assert deployability_problems(NativeCheckpoint(native), **export_options)[0].case == case
    assert not (tmp_path / "out").exists()
    assert sorted(path.name for path in native.iterdir()) == before  # the input is never written


def test_group_size_is_checked_against_the_tensor_parallel_slice(tmp_path):
    native = native_folder(tmp_path, "moe-ref-mx", group_size=32)  # intermediate 288 = 9 groups of 32
    checkpoint = NativeCheckpoint(native)
    assert deployability_problems(checkpoint, tp=1) == []
    assert [problem.case for problem in deployability_problems(checkpoint, tp=2)] == ["group_size"] * 6
    assert deployability_problems(checkpoint, tp=3) == []  # 96 per rank: 3 groups


def test_a_deployable_model_has_no_problems(tmp_path):
    native = native_folder(tmp_path, "moe-ref-mx", bits=4, symmetric=False)  # asymmetric 4-bit: vLLM's ZP kernels
    assert deployability_problems(NativeCheckpoint(native), consumers=("vllm",)) == []
    # plain transformers decodes MoE experts without zero points: refused unless the export is for vLLM only
    assert [p.case for p in deployability_problems(NativeCheckpoint(native))] == ["transformers_asymmetric"]


def test_the_tp_hint_appears_only_when_another_tp_fixes_it(tmp_path):
    native = native_folder(tmp_path, "moe-ref-mx", group_size=32)  # intermediate 288 = 9 groups of 32
    [fix] = {p.fix for p in deployability_problems(NativeCheckpoint(native), tp=2)}  # one per MoE layer, same fix
    assert fix == "quantize with a `group_size` dividing 144 (e.g. 16), or export for another --tp (1, 3, 9)"
    native = native_folder(tmp_path / "g128", "moe-ref-mx", group_size=128) if (tmp_path / "g128").mkdir() is None \
        else None
    messages = {p.message() for p in deployability_problems(NativeCheckpoint(native))}
    # 288 / tp is never a multiple of 128, and hidden (256) is not split: no --tp can help
    assert messages and not any("--tp" in message for message in messages)
