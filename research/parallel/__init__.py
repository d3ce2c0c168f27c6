"""Parallelism: device meshes and DP/FSDP sharding (``sharding``), ring collectives
(``collectives``), multi-host start-up, barriers and watchdogs (``distributed``)."""
