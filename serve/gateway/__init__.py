"""The gateway: the only public surface (OpenAI API, auth, turn logging, metrics)."""
