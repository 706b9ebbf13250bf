"""moecompress: make Mixture-of-Experts language models small enough to deploy while keeping them good.

Layers (data flows one way, DESIGN.md): ``models`` (a uniform view of every MoE family) -> ``kernels`` (packed
low-bit experts) -> ``checkpoint`` (files) -> ``calibration`` (statistics) -> ``analysis`` (scores) -> ``stages`` ->
``pruning`` / ``quantization`` (decisions via ``solvers``, edits via ``models``) -> ``export`` / ``evals`` ->
``recipe`` -> ``pipeline`` -> ``commands`` / ``cli``.

`import moecompress` is what lets plain ``AutoModelForCausalLM.from_pretrained`` load moecompress's native (packed)
checkpoints: their config names quant_method "moecompress", registered here with transformers.
"""

from moecompress.errors import report_interrupt_on_one_line
from moecompress.version import __version__

try:  # torch and transformers take seconds to import: Ctrl-C then must not print a traceback
    from moecompress.checkpoint.native import register_native_format
except KeyboardInterrupt:
    report_interrupt_on_one_line()
    raise

register_native_format()

__all__ = ["__version__"]
