"""Scheduling: admission by estimated device seconds, the cost model, the micro-batcher and the device worker."""
