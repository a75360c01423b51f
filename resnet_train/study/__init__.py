"""Analysis of finished (or running) runs: reading run directories, summary tables, plots.

Reads only what a run directory holds (``config.yaml``, ``metrics.jsonl``); no training code,
no torch. Plotting needs the ``plot`` extra (matplotlib).
"""
