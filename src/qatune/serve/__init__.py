"""Serving a tuned model: an OpenAI-compatible HTTP API over the continuous batcher, and a chat page."""
