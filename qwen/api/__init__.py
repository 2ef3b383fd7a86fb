"""The OpenAI-compatible API server: protocol models, ReAct tool calls, the FastAPI app, the CLI."""
