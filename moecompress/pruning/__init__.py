"""Expert-level and micro-expert pruning and merging."""
