"""An OpenAI-compatible HTTP server with continuous batching (needs the `serve` extra: FastAPI, uvicorn)."""
