"""The plugin API: everything a virtualizer may import from the launcher, and nothing else.

A virtualizer package (``virtualizers/<name>/``) imports only these modules; the launcher's core finds it only
through its ``launcher.virtualizers`` entry point (pyproject.toml, `launcher.backends`), never by import.
`tests/test_layering.py` holds both directions. What each module gives a plugin:

- `spec`: the instance model, `InstanceSpec` (with `Networking` and `StorageEntry`), resources already filled
  from the node's defaults, and the image-id rule.
- `identity`: what a START's meta-data means for the guest (instance-id, hostname, SSH keys), whatever the
  seed format, and the hostname rule.
- `errors`: ciao's error codes and the exceptions: `VirtualizerError` for a failed call, `SetupError` for a
  host or configuration that cannot work (one line that says what to do).
- `protocol`: the contract: `Virtualizer` (one per instance, called one call at a time by the instance's
  actor), `Backend` (one per process), `OpenBackend` (what the entry point is), `MonitorEvent`, `VmStats`, and the
  optional `ImageCatalog`.
- `host`: `BackendHost`, what the launcher lends a backend: the data dir, its worker-thread limiter, the event
  journal (`emit`), the per-instance log (`log`) and its own START steps' timings for /metrics (`observe_step`).
- `volumes`: what a START's `storage` entries mean (local, ephemeral, ...), on a backend's volume store.
- `files`: crash-safe private writes (`atomic_write`, `fsync_dir`) and the instance dir's modes.
- `settings`: `parse_section`, the one way to declare and check a plugin's own config section.

These modules import nothing else from the launcher, so a change to the core cannot reach a plugin except
through them.
"""
