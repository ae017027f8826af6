"""The core: the instance table and admission (`supervisor`), one actor per instance (`actor` and the modules
it is split into), the command × state table (`lifecycle`), the commands it carries out (`commands`), recovery
after a restart (`recovery`, `bootid`), statistics (`stats`), metrics (`metrics`), the configuration (`config`)
and the registry of backends (`backends`).

It imports the durable stores and the plugin API below it, never the transport or the CLI
(docs/architecture.md §2, tests/test_layering.py).
"""
