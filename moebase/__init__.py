"""moebase: the lowest layer of moesim's code, imported by everything and importing nothing of it.

``units`` (unit parsing and human-unit constants), ``files`` (size-checked reads) and ``parquet_io`` (atomic
Parquet files with a JSON header). See docs/architecture.md for the package order.
"""
