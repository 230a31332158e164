"""mockllm: an OpenAI-compatible mock endpoint for tests, benchmarks and demos (not the runtime)."""
