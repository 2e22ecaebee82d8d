"""Serving the agents' models: the OpenAI-compatible endpoint's core (`gateway.py`)."""
