"""The `launcher` program: its verbs (`main`), the HTTP client they use (`client`), `launcher serve` (`serve`:
start order, root nurseries, SIGTERM), `launcher hard-reset` (`hard_reset`) and the open-file limit (`fdlimit`).

The top layer: it wires the transport, the core, the durable stores and a backend together, and nothing below
imports it (docs/architecture.md §2, tests/test_layering.py).
"""
