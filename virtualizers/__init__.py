"""Virtualizer backends, one package each, registered as ``launcher.virtualizers`` entry points.

Each imports only the plugin API, `launcher.plugin`, and never another virtualizer.
"""
