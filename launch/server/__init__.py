"""qshard's OpenAI-compatible HTTP server (FastAPI): app.py routes, protocol.py requests and
responses, metrics.py the Prometheus text; launch/cmd_serve.py starts it."""
