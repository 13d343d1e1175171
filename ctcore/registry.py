"""Builds the component registry from the `ctcore` entry-point group (the only discovery path).

A fresh pluggy PluginManager is made on every `load_registry()` call, never at import time, so tests and
programs never share hidden state.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from typing import Any

import attrs
import pluggy

from ctcore import hookspecs
from ctcore.components import ALL_KINDS, CONTEXT_KEYS, HOOKS, NAME_PATTERN, RESERVED_OPTIONS, BuildContext, range_text
from ctcore.errors import PluginError, UnknownComponentError, UsageError, unknown_name_message

ENTRY_POINT_GROUP = "ctcore"
DISABLE_ENV = "CTCORE_DISABLE_PLUGINS"
"""Comma-separated entry-point or distribution names to skip, e.g. CTCORE_DISABLE_PLUGINS=ctcore-example."""
ONLY_ENV = "CTCORE_ONLY_PLUGINS"
"""Comma-separated entry-point or distribution names to load, skipping every other plugin; e.g.
CTCORE_ONLY_PLUGINS=ctcore gives the builtins alone whatever else is installed (what ctcore's own tests see)."""



@attrs.frozen
class Provider:
    """Where a component comes from: the distribution that registered its entry point."""

    distribution: str
    version: str
    entry_point: str
    module: str


@attrs.frozen
class PluginLoadFailure:
    """An entry point that failed to load; the registry still works without it."""

    entry_point: str
    distribution: str
    error: str

    def message(self) -> str:
        return (
            f"plugin {self.entry_point!r} from {self.distribution} failed to load ({self.error}); "
            f"it is skipped. Fix or uninstall it, or set {DISABLE_ENV}={self.entry_point} to silence this."
        )


class Registry:
    """Component classes by kind and name, with the distribution that provides each."""

    def __init__(self) -> None:
        self._classes: dict[str, dict[str, type]] = {k: {} for k in ALL_KINDS}
        self._providers: dict[tuple[str, str], Provider] = {}
        self.failures: list[PluginLoadFailure] = []
        self.plugin_manager: pluggy.PluginManager | None = None

    def _check_kind(self, kind: str) -> None:
        if kind not in ALL_KINDS:
            raise UsageError(unknown_name_message("component kind", kind, list(ALL_KINDS)))

    def names(self, kind: str) -> list[str]:
        """Sorted component names of one kind."""
        self._check_kind(kind)
        return sorted(self._classes[kind])

    def get(self, kind: str, name: str) -> type:
        """The class registered as `name`; unknown names raise with a did-you-mean and the available list."""
        self._check_kind(kind)
        try:
            return self._classes[kind][name]
        except KeyError:
            raise UnknownComponentError(kind, name, self.names(kind)) from None

    def provider(self, kind: str, name: str) -> Provider:
        self.get(kind, name)
        return self._providers[(kind, name)]

    def create(self, kind: str, name: str, /, **kwargs: Any) -> Any:
        """Build a component: keyword arguments named like BuildContext fields form the context, the rest
        are options (e.g. `create("curriculum", "exponential", total_steps=400_000, s0=10)`)."""
        cls = self.get(kind, name)
        context = BuildContext(**{k: kwargs.pop(k) for k in CONTEXT_KEYS if k in kwargs})
        known = [f.name for f in attrs.fields(cls.Options)]
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            raise UsageError(f"{kind} {name!r}: unknown options {unknown} (its options: {', '.join(known) or 'none'})")
        try:
            return cls(cls.Options(**kwargs), context)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{kind} {name!r}: {exc}") from None

    def add(self, kind: str, cls: type, provider: Provider) -> None:
        """Register one class, validating its shape; a duplicate name names both providers."""
        self._check_kind(kind)
        where = f"{provider.distribution} (entry point {provider.entry_point!r})"
        validate_class(kind, cls, where)
        name = cls.name
        if name in self._classes[kind]:
            other = self._providers[(kind, name)]
            raise PluginError(
                f"{kind} {name!r} is registered twice: by {other.distribution} (entry point "
                f"{other.entry_point!r}) and by {where}. Uninstall one, or disable one with {DISABLE_ENV}."
            )
        self._classes[kind][name] = cls
        self._providers[(kind, name)] = provider

    def rows(self) -> list[dict[str, Any]]:
        """One dict per component: kind, name, summary, provider, options with defaults."""
        out = []
        for kind in ALL_KINDS:
            for name in self.names(kind):
                cls, prov = self._classes[kind][name], self._providers[(kind, name)]
                out.append(
                    {
                        "kind": kind,
                        "name": name,
                        "summary": cls.summary,
                        "distribution": prov.distribution,
                        "version": prov.version,
                        "options": {f.name: _default(f) for f in attrs.fields(cls.Options)},
                        "ranges": {f.name: range_text(f) for f in attrs.fields(cls.Options) if range_text(f)},
                    }
                )
        return out


def validate_class(kind: str, cls: type, where: str) -> None:
    """The shape every component class needs (name, summary, attrs Options, no reserved option names)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise PluginError(f"{where} registers a {kind} class {cls!r} without a kebab-case `name` attribute")
    if not isinstance(getattr(cls, "summary", None), str):
        raise PluginError(f"{kind} {name!r} from {where} has no `summary` string")
    options = getattr(cls, "Options", None)
    if options is None or not attrs.has(options):
        raise PluginError(f"{kind} {name!r} from {where} has no attrs `Options` class")
    clash = [f.name for f in attrs.fields(options) if f.name in RESERVED_OPTIONS]
    if clash:
        raise PluginError(f"{kind} {name!r} from {where}: option names {clash} are reserved")


def _undecorated_hooks(plugin: object) -> list[str]:
    """Functions named like hooks but missing @ctcore.hookimpl: pluggy would silently ignore them."""
    return [n for n in dir(plugin) if n.startswith("ctcore_register_")
            and callable(getattr(plugin, n)) and not hasattr(getattr(plugin, n), "ctcore_impl")]


def _default(field: attrs.Attribute) -> Any:
    d = field.default
    if isinstance(d, attrs.Factory):  # type: ignore[arg-type]
        d = d.factory()
    return list(d) if isinstance(d, tuple) else d


def _disabled() -> set[str]:
    return {s.strip() for s in os.environ.get(DISABLE_ENV, "").split(",") if s.strip()}


def _only(eps: list[md.EntryPoint]) -> set[str] | None:
    """The names in CTCORE_ONLY_PLUGINS (None when unset or empty); a name that is no entry point or distribution
    of the group is a usage error, since it would silently leave the registry without the plugins meant."""
    only = {s.strip() for s in os.environ.get(ONLY_ENV, "").split(",") if s.strip()}
    if not only:
        return None
    dists = {ep.dist.name for ep in eps if ep.dist is not None}
    unknown = sorted(only - dists - {ep.name for ep in eps})
    if unknown:
        raise UsageError(
            f"{ONLY_ENV}: no installed plugin has the entry point or distribution name {', '.join(map(repr, unknown))} "
            f"(distributions with plugins: {', '.join(sorted(dists)) or 'none'}); correct it, or unset {ONLY_ENV} "
            f"to load every plugin"
        )
    return only


def load_registry() -> Registry:
    """Discover plugins through the `ctcore` entry-point group and collect their components.

    A plugin that fails to import is recorded in `registry.failures` (and named by the CLI); the rest still
    work. Duplicate names and malformed classes raise `PluginError`. CTCORE_ONLY_PLUGINS and
    CTCORE_DISABLE_PLUGINS select the plugins loaded; a name in CTCORE_ONLY_PLUGINS that matches nothing raises
    `UsageError`.
    """
    registry = Registry()
    pm = pluggy.PluginManager("ctcore")
    pm.add_hookspecs(hookspecs)
    registry.plugin_manager = pm
    disabled = _disabled()
    eps = sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value))
    only = _only(eps)
    seen: set[tuple[str, str]] = set()
    for ep in eps:
        dist = ep.dist.name if ep.dist is not None else "<unknown distribution>"
        version = ep.dist.version if ep.dist is not None else "?"
        if (dist, ep.name) in seen:  # the same distribution found twice on sys.path
            continue
        seen.add((dist, ep.name))
        if ep.name in disabled or dist in disabled or (only is not None and not {ep.name, dist} & only):
            continue
        plugin = None
        try:
            plugin = ep.load()
            pm.register(plugin, name=f"{dist}:{ep.name}")
            pm.check_pending()  # a misspelt hook name is a broken plugin, not a silent no-op
            bare = _undecorated_hooks(plugin)
            if bare:
                raise PluginError(f"{', '.join(bare)} lack the @ctcore.hookimpl decorator")
            found = {
                kind: [cls for impl in getattr(pm.hook, hook).get_hookimpls() if impl.plugin is plugin
                       for cls in (impl.function() or [])]
                for kind, hook in HOOKS.items()
            }
            for kind, classes in found.items():  # a malformed class disables its plugin, not the registry
                for cls in classes:
                    validate_class(kind, cls, f"{dist} (entry point {ep.name!r})")
        except Exception as exc:  # a broken plugin must not take the registry down
            if plugin is not None and pm.is_registered(plugin):
                pm.unregister(plugin)
            registry.failures.append(PluginLoadFailure(ep.name, dist, f"{type(exc).__name__}: {exc}"))
            continue
        provider = Provider(dist, version, ep.name, getattr(plugin, "__name__", ep.value))
        for kind, classes in found.items():
            for cls in classes:
                registry.add(kind, cls, provider)
    return registry
