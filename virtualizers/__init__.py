"""Virtualizers: the pluggable backends that actually run VMs (see virtualizers/base.py)."""
