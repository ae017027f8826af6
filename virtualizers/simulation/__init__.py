"""The simulation virtualizer: fake VMs, in memory or as plain local processes (`simvm`), for tests, scale runs and
demos.

- `backend`: the entry point (`open_backend`) and `SimulationBackend`; `settings`: the `simulation:` section and
  its failure injection.
- `instance`: what both modes' virtualizers share (and `SimulationParts`, what they read of the backend);
  `memory_vm`: memory mode (`MemoryVirtualizer`) over `vm_table` (the fake VMs, `VmTable`, and their boot clock);
  `process_vm`: process mode (`ProcessVirtualizer`).
- `volumes`: its volume store (a JSON file per volume).
- `simvm`: the fake VM process, run as ``python -m virtualizers.simulation.simvm``.
"""
