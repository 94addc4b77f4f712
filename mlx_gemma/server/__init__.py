"""HTTP server: the Workers AI routes, fine-tunes and OpenAI-compatible routes (Starlette)."""
