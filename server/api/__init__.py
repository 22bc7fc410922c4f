"""The OpenAI-compatible HTTP layer of the router."""
