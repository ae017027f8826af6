"""The QEMU/KVM virtualizer, on libvirt.

- `backend`: the entry point (`open_backend`), its settings (`QemuSettings`) and `QemuVirtualizer`, the
  per-instance calls, in the order an instance meets them.
- `images`: the backing-image store (`<data_dir>/images/`), imports, checksums and gc; `import_policy`: where
  images may be imported from.
- `cloudinit`: the cloud-init seed (NoCloud or ConfigDrive ISO) of an instance.
- `domain`: the libvirt domain XML of an instance.
- `hypervisor`: the libvirt connection, every call bounded, lifecycle events.
- `preflight`: the host checks `launcher serve` runs before it serves.
"""
