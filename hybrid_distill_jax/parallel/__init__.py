"""Device mesh and sharding rules, and multi-process start-up."""
