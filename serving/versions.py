"""The model versions one server holds: the champion (answers `/predict`), optionally the shadow
challenger and pinned versions, each loaded once.

What answers is one immutable `Served` snapshot; a reload builds a new one (reusing every version
already loaded) and swaps it in with one reference assignment, so a request in flight finishes on
the versions it started with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from serving.store import ModelNotFound, ResolvedModel, ServingError

if TYPE_CHECKING:
    from serving.metrics import Metrics
    from serving.model import LoadedModel
    from serving.store import Store

CHAMPION, CHALLENGER, PINNED = "champion", "challenger", "pinned"


@dataclass(frozen=True)
class Served:
    """What answers now: the champion, the shadow challenger (never answers), every loaded version."""

    champion: LoadedModel
    challenger: LoadedModel | None = None
    versions: Mapping[str, LoadedModel] = field(default_factory=dict)  # version -> model, each loaded once

    @property
    def name(self) -> str:
        """The model's name on the v2 routes: the registered name, else `model` (a folder or run URI)."""
        return self.champion.resolved.name or "model"

    def version(self, version: str) -> LoadedModel | None:
        return self.versions.get(version)

    def roles(self) -> dict[str, tuple[str, str]]:
        """role -> (name, version) of the champion and challenger, and each pinned version."""
        out = {CHAMPION: (self.name, self.champion.resolved.version or "")}
        if self.challenger is not None:
            out[CHALLENGER] = (self.name, self.challenger.resolved.version or "")
        taken = {v for _, v in out.values()}
        for v in self.versions:
            if v not in taken:
                out[f"{PINNED} {v}"] = (self.name, v)
        return out


class ReloadOutcome(NamedTuple):
    previous_version: str | None
    version: str | None
    reloaded: bool


class ModelSet:
    """Loads and reloads the versions a server holds (SERVING_MODEL_URI, SERVING_SHADOW_ALIAS,
    SERVING_MODEL_VERSIONS); tests build one with `ModelSet.fixed`."""

    def __init__(self, uri: str | None, store: Store | None, *, shadow_alias: str | None = None,
                 pinned: Sequence[str] = (), metrics: Metrics | None = None) -> None:
        self.uri = uri  # None: the one registered model with a @champion (Store.default_uri), found at load
        self.store = store
        self.shadow_alias = shadow_alias
        self.pinned = list(pinned)
        self.metrics = metrics
        self.served: Served | None = None
        self.error: str | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def fixed(cls, champion: LoadedModel | None, challenger: LoadedModel | None = None,
              pinned: Sequence[LoadedModel] = ()) -> ModelSet:
        """Models already loaded, with no store to reload from."""
        held = cls(champion.resolved.uri if champion else None, None)
        if champion is not None:
            versions = {m.resolved.version: m for m in (champion, challenger, *pinned) if m is not None and m.resolved.version}
            held.served = Served(champion, challenger, versions)
        return held

    @property
    def current(self) -> LoadedModel | None:
        """The champion, or None before the first load."""
        return self.served.champion if self.served is not None else None

    async def reload(self, *, force: bool = False) -> ReloadOutcome:
        """Load what the URI, the shadow alias and the pinned versions point at now, if anything
        changed (or force). Only versions not loaded yet are downloaded."""
        async with self._lock:
            try:
                outcome = await self._reload(force)
            except ServingError:
                if self.metrics is not None:
                    self.metrics.reloads.labels("failure").inc()
                raise
            if self.metrics is not None:
                self.metrics.reloads.labels("swapped" if outcome.reloaded else "unchanged").inc()
            return outcome

    async def _reload(self, force: bool) -> ReloadOutcome:
        if self.store is None:  # a fixed set: /reload and start-up check first, polling ignores failures
            raise ServingError("this server holds fixed models: nothing to reload")
        store = self.store
        if self.uri is None:
            self.uri = await asyncio.to_thread(store.default_uri)
        uri = self.uri
        champion = await asyncio.to_thread(store.resolve, uri)
        challenger = await asyncio.to_thread(self._resolve_challenger, store, champion)
        old = self.served
        old_version = old.champion.resolved.version if old else None
        old_challenger = old.challenger.resolved.version if old and old.challenger else None
        now_challenger = challenger.version if challenger else None
        if not force and old is not None and (champion.version, now_challenger) == (old_version, old_challenger):
            return ReloadOutcome(old_version, old_version, False)
        pinned = [await asyncio.to_thread(self._resolve_version, store, champion, v) for v in self.pinned]
        cache = dict(old.versions) if old is not None and not force else {}
        loaded: dict[str, LoadedModel] = {}

        async def get(resolved: ResolvedModel) -> LoadedModel:
            key = resolved.version
            model = loaded.get(key) if key else None
            if model is None and key:
                model = cache.get(key)
            if model is None:
                model = await asyncio.to_thread(self._fetch, resolved, store)
            if key:
                loaded[key] = model
            return model

        champion_model = await get(champion)
        challenger_model = await get(challenger) if challenger is not None else None
        for resolved in pinned:
            await get(resolved)
        served = Served(champion_model, challenger_model, loaded)
        self.served = served  # the swap: one reference
        self.error = None
        if self.metrics is not None:
            self.metrics.set_models(served.roles())
        return ReloadOutcome(old_version, champion.version, True)

    def _fetch(self, resolved: ResolvedModel, store: Store) -> LoadedModel:
        from serving.model import fetch

        try:
            model = fetch(resolved, store)
        except ServingError:
            if self.metrics is not None:
                self.metrics.loads.labels("failure").inc()
            raise
        if self.metrics is not None:
            self.metrics.loads.labels("success").inc()
        return model

    def _resolve_challenger(self, store: Store, champion: ResolvedModel) -> ResolvedModel | None:
        """The shadow alias's version; none yet (no challenger registered) is not an error."""
        if not self.shadow_alias or champion.name is None:
            return None
        try:
            resolved = store.resolve(f"models:/{champion.name}@{self.shadow_alias}")
        except ModelNotFound:
            return None
        return None if resolved.version == champion.version else resolved

    @staticmethod
    def _resolve_version(store: Store, champion: ResolvedModel, version: str) -> ResolvedModel:
        if champion.name is None:
            raise ServingError(f"SERVING_MODEL_VERSIONS needs a registered model; {champion.uri} is not one")
        return store.resolve(f"models:/{champion.name}/{version}")
