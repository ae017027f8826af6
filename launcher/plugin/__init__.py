"""The plugin API: everything a virtualizer may import from the launcher, and nothing else.

A virtualizer package (``virtualizers/<name>/``) imports only these modules; the launcher's core finds it only
through its ``launcher.virtualizers`` entry point (pyproject.toml, `launcher.core.backends`), never by import.
`tests/test_layering.py` holds both directions. What each module gives a plugin (no re-exports here: each name
has one home):

- `protocol`: the contract, in its docstrings: `OpenBackend` (what the entry point is), `Backend` (one per
  process, with its optional parts), `Virtualizer` (one per instance, called one call at a time by the instance's
  actor: each method, its bound and its failure code), `MonitorEvent` / `MonitorInbox`, `VmStats`; the optional
  stores `ImageCatalog` / `ImageRecord` and `VolumeCatalog` / `VolumeInfo` (with `VOLUME_FORMATS`,
  `MAX_VOLUME_MB`, `is_valid_volume_id`).
- `spec`: the instance model, `InstanceSpec` (with `Networking` and `StorageEntry`), resources already filled
  from the node's defaults, and the image-id rule.
- `identity`: what a START's meta-data means for the guest (instance-id, hostname, SSH keys), whatever the
  seed format or virtualizer: `parse_meta_data` (the text), `read_identity`, and the hostname rule.
- `guest_network`: what a START's `networking` means for the guest's address: the MAC, the static address
  (private_ip in subnet) and the default-gateway rule, for a VM's seed and a container's engine network alike.
- `volumes`: what a START's `storage` entries mean (boot, local, ephemeral, swap, tags, the disk plan), the same
  for every virtualizer, carried out on a backend's volume store; `MAX_VOLUMES`.
- `errors`: ciao's error codes and the exceptions: `LauncherError`, `VirtualizerError` for a failed call,
  `SetupError` for a host or configuration that cannot work (one line that says what to do); `write_failure`.
- `host`: `BackendHost`, what the launcher lends a backend: the data dir, its worker-thread limiter, the event
  journal (`emit`), the per-instance log (`log`) and its own START steps' timings for /metrics (`observe_step`).
- `settings`: `parse_section` and the validators `one_of`, `at_least`, `at_most`: the one way to declare and
  check a plugin's own config section (`ConfigError`).
- `files`: crash-safe private writes (`atomic_write`, `create_new`, `make_dirs`, `fsync_dir`) and the instance
  dir's modes.
- `locks`: `KeyedLocks`, one lock per key: how a store serialises the operations on one image or volume id.
- `usage`: `CpuMeter`, a VM's CPU use between two `stats()` calls (`VmStats.cpu_percent`).
- `tools`: `run_tool`, the one way to run an external program (qemu-img, mkswap, ...) under a bound, with
  `ToolError` naming the tool and saying how it failed.

These modules import nothing else from the launcher, so a change to the core cannot reach a plugin except
through them.
"""
