"""The package version (one place: ``moecompress.__version__``, reports and ``--version`` read it)."""

__version__ = "0.1.0"
