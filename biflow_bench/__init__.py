"""biflow-bench: reproducible ablation benchmarks for Bidirectional Normalizing Flow (BiFlow) and iTARFlow."""

__version__ = "0.1.0"
