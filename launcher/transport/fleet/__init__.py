"""The launcher in a fleet of launchers on NATS JetStream (the optional `fleet:` section; docs/fleet.md): commands
by request/reply, placement by auction, events into a durable stream and liveness in a key-value bucket.
`node.FleetNode` is this launcher's side; `subjects` names the protocol; `bridge` runs nats-py (asyncio) beside
Trio."""
