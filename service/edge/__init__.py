"""The HTTP edge: middleware, connection limits, the uvicorn server, auth, who is calling, route paths, the OpenAPI schema and request logs."""
