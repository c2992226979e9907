"""nexus-extproc: an Envoy ext_proc server that prices LLM requests and enforces spend budgets."""

__version__ = "0.1.0"
