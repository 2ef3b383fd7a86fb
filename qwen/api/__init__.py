"""OpenAI-compatible API pieces (the server itself comes with the serving engine)."""
