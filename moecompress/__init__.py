"""moecompress: make Mixture-of-Experts language models small enough to deploy while keeping them good.

Layers (data flows one way): ``models`` (a uniform view of every MoE family) -> ``calibration`` (statistics) ->
``analysis`` (scores) -> ``pruning`` / ``quantization`` (decisions via ``solvers``, edits via ``models``) ->
``export`` -> ``evals``. ``kernels`` runs packed low-bit experts.
"""

__version__ = "0.1.0"


def _register_native_format() -> None:
    # `import moecompress` is what lets plain `AutoModelForCausalLM.from_pretrained` load moecompress's native
    # (packed) checkpoints: their config names quant_method "moecompress", registered here with transformers.
    from moecompress.export.native import register_native_format

    register_native_format()


_register_native_format()
