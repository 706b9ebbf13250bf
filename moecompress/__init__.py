"""moecompress: make Mixture-of-Experts language models small enough to deploy while keeping them good.

Layers (data flows one way): ``models`` (a uniform view of every MoE family) -> ``calibration`` (statistics) ->
``analysis`` (scores) -> ``pruning`` / ``quantization`` (decisions via ``solvers``, edits via ``models``) ->
``export`` -> ``evals``. ``kernels`` runs packed low-bit experts.
"""

__version__ = "0.1.0"
