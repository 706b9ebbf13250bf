"""Save and load compressed checkpoints (native, compressed-tensors, plain HF)."""
