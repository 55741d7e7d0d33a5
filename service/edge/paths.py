"""Route paths, some of them templates (`/v1/models/{model_id}`): which route a request's path is."""

from __future__ import annotations

import re
from collections.abc import Iterable


class RoutePaths:
    """A set of route paths that also matches templated ones, one path segment per parameter."""

    def __init__(self, paths: Iterable[str]):
        paths = list(paths)
        self._exact = frozenset(path for path in paths if "{" not in path)
        self._templates = [
            (path, re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)) + "$"))
            for path in paths
            if "{" in path
        ]

    def match(self, path: str) -> str | None:
        """The route's path (its template, for a templated route), or None: a bounded metric label."""
        if path in self._exact:
            return path
        return next((template for template, pattern in self._templates if pattern.match(path)), None)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.match(path) is not None

    @classmethod
    def of(cls, *routers: object) -> RoutePaths:
        return cls(
            getattr(route, "path", "") for router in routers for route in getattr(router, "routes", ())
        )
