"""Fake OpenAI-, Anthropic- and Ollama-shaped upstreams for the demo, the tests and the benchmark."""
