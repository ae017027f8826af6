"""Durable state on disk: the data dir's layout and lock (`datadir`), the instance write-ahead log
(`persist`), the instance record (`records`), the event journal (`events`) and the per-instance logs (`logs`).

It imports only the plugin API below it (docs/architecture.md §2, tests/test_layering.py).
"""
