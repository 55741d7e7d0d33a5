"""Distilling the embedded default model: a TiUE student of a small teacher on a synthetic domain.

Run `python -m distill --help` for the stages.
"""
