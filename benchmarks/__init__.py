"""Benchmarks (not timed tests): each ``bench_*.py`` has ``main()`` that writes ``benchmarks/results/<name>.md``;
``python -m benchmarks.run_all`` runs them all and assembles ``benchmarks/results.md``."""
