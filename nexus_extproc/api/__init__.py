"""Our own gRPC admin API (protos/nexus/budget/v1). The *_pb2 modules are generated and committed; regenerate
with `python -m nexus_extproc.api.generate` (a test fails if they are stale)."""
