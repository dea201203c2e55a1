"""Backends: local llama.cpp models and remote OpenAI-compatible endpoints."""
