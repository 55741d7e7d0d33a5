"""HTTP service for TiUE pipelines: FastAPI app, micro-batcher, device worker, metrics.

Kept import-free so `tiue --help` does not pay for FastAPI or torch; import `service.app`.
"""
