"""Launcher: a per-node agent that runs virtual machines on ciao-format commands."""
