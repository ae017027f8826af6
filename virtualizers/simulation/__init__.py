"""The simulation virtualizer: VMs that are plain local processes (`simvm`), for tests, scale runs and demos.

- `backend`: the entry point (`open_backend`), its settings and `SimulationVirtualizer`.
- `volumes`: its volume store (a JSON file per volume).
- `simvm`: the fake VM process, run as ``python -m virtualizers.simulation.simvm``.
"""
