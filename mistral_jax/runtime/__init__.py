"""Where programs run: the device mesh and its sharding rules, multi-host start-up, XLA flags."""
