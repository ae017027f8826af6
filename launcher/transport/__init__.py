"""Transport: bytes to commands and back. The HTTP/1.1 connection loop (`http`), the unix socket
(`unix_listener`), the API token file (`api_token`), the routes (`api`, `image_routes`, `volume_routes`), the
scrape-time gauges of /metrics (`state_metrics`) and the payload parser (`payloads`).

It reads and commands instances only through the supervisor (`launcher.core.supervisor`), never an actor, and
knows nothing of VMs (docs/architecture.md §2, tests/test_layering.py).
"""
