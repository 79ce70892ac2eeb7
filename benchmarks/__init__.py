"""Benchmarks: one ``bench_<subject>.py`` per subject, run as ``python -m benchmarks.bench_<subject>`` from the repo
root; each appends its rows to ``benchmarks/results.csv`` (``common.write_rows``) and imports its peers from
``peers``. ``RESULTS.md`` shows the current numbers."""
