"""Calibration: run samples through the unpruned model and keep only the statistics searches need."""
from .cache import calibrate, default_cache_dir
from .collect import collect_stats
from .data import DataError, Sample, SampleSet, demo_samples, load_samples

__all__ = ["DataError", "Sample", "SampleSet", "calibrate", "collect_stats", "default_cache_dir", "demo_samples",
           "load_samples"]
