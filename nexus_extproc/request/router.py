"""Which backend serves a request, and which local model may stand in for it.

Routing is by API (path) and model: a backend only receives the API its provider speaks, and the first
backend whose model patterns match wins; otherwise that provider's `default` backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from nexus_extproc.apis.errors import NexusError, not_found
from nexus_extproc.config import BackendConfig, NexusConfig
from nexus_extproc.memo import BoundedMemo


@dataclass(frozen=True, slots=True)
class Route:
    backend: str
    cluster: str
    backend_type: str  # "cloud" | "local"
    api: str  # the client API family it speaks
    price_provider: str  # the genai-prices provider whose prices it charges


class Router:
    def __init__(self, config: NexusConfig) -> None:
        self._backends = config.backends
        self._equivalents = config.equivalents
        self.unhealthy: set[str] = set()  # backend names Envoy reports without healthy hosts
        self._routes: BoundedMemo[tuple[str, str], Route] = BoundedMemo()

    def _route(self, name: str, b: BackendConfig) -> Route:
        return Route(name, b.cluster, b.type, b.provider, b.prices_from)

    def by_name(self, name: str) -> Route | None:
        """A backend's route by its name (a settlement snapshot names the backend that served it)."""
        b = self._backends.get(name)
        return None if b is None else self._route(name, b)

    def route(self, family: str, model: str) -> Route:
        """Memoised (bounded): the answer depends only on the config, and glob-matching every backend's model
        patterns cost ~4 µs a request."""
        key = (family, model)
        hit = self._routes.get(key)
        if hit is None:
            hit = self._routes.put(key, self._resolve(family, model))
        return hit

    def _resolve(self, family: str, model: str) -> Route:
        candidates = [(n, b) for n, b in self._backends.items() if b.provider == family]
        for name, b in candidates:
            if b.serves(model):
                return self._route(name, b)
        for name, b in candidates:
            if b.default:
                return self._route(name, b)
        for name, b in candidates:
            if b.type == "cloud":
                return self._route(name, b)
        raise NexusError(404, "not_found_error", f"no backend serves the {family} API") if not candidates \
            else not_found("no backend serves the requested model")

    def equivalent(self, model: str, family: str) -> tuple[Route, str] | None:
        """The configured local stand-in for `model`, if its backend speaks the caller's API and is up."""
        target = self._equivalents.get(model)
        if target is None:
            return None
        name, _, local_model = target.partition("/")
        b = self._backends[name]
        if b.provider != family or name in self.unhealthy:
            return None
        return self._route(name, b), local_model
