"""Calibration: data (files, hub, bundled), the layer-by-layer runner, and the statistics it collects in one pass."""

from moecompress.calibration.data import (
    CalibrationSet,
    load_calibration,
    read_documents,
    sample_sequences,
    token_ids_sha256,
)
from moecompress.calibration.runner import CalibrationRun, LayerwiseRunner, collect_statistics, peak_memory_bytes
from moecompress.calibration.statistics import (
    STATISTICS,
    LayerStatistics,
    Statistic,
    histogram_quantile,
    register_statistic,
    statistic_descriptions,
    tcess_markers,
)

__all__ = [
    "STATISTICS",
    "CalibrationRun",
    "CalibrationSet",
    "LayerStatistics",
    "LayerwiseRunner",
    "Statistic",
    "collect_statistics",
    "histogram_quantile",
    "load_calibration",
    "peak_memory_bytes",
    "read_documents",
    "register_statistic",
    "sample_sequences",
    "statistic_descriptions",
    "tcess_markers",
    "token_ids_sha256",
]
