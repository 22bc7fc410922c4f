"""The router: OpenAI HTTP in front, ZeroMQ to the worker pools behind."""
