"""Helpers for tests and benches, never imported by engine/ or service/."""
