"""The OpenAI-compatible gateway: HTTP layer, routing engine, resilience, metrics."""
