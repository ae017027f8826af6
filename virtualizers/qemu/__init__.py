"""The QEMU/KVM virtualizer, on libvirt.

- `backend`: the entry point (`open_backend`) and `QemuBackend`, what the instances share (connection, stores,
  orphan scan, preflight); `settings`: the `qemu:` config section (`QemuSettings`).
- `virtualizer`: `QemuVirtualizer`, one instance's calls, in the order an instance meets them.
- `instance_files`: the files of an instance dir (overlay, seed, NVRAM, console) and the overlay's making.
- `domain`: the libvirt domain XML of an instance (pure); `domain_calls`: the blocking libvirt calls on domains.
- `hypervisor`: the libvirt connection, every call bounded, lifecycle events.
- `images`: the backing-image store (`<data_dir>/images/`), its commits, gc and start-up; `image_import`: the
  import pipeline (sources, hashing, qemu-img info); `image_errors`: its errors; `import_policy`: where images
  may be imported from.
- `volumes`: the volume store, volumes of a libvirt storage pool; `pool_calls`: the blocking libvirt calls on
  pools and volumes; `volume_records`: what libvirt does not keep about a volume; `swap`: swap volumes (mkswap).
- `qemu_img`: the qemu-img commands (create an overlay, info, convert), each under its bound.
- `cloudinit`: the cloud-init seed (NoCloud or ConfigDrive ISO) of an instance.
- `preflight`: the host checks `launcher serve` runs before it serves.
"""
