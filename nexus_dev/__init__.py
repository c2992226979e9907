"""Demo and test tooling, kept out of the runtime wheel: the process stack (fakes, ext_proc, Envoy), the
fake upstreams, and the Envoy config generator. It imports nexus_extproc; nexus_extproc never imports it."""
