"""``relayd plugin-cache``: write Twisted's plugin cache at install time.

Why this exists.  ``twistd relayd`` finds relayd through Twisted's plugin
system: it scans every ``twisted/plugins`` directory on ``sys.path`` and
keeps what it learnt in a ``dropin.cache`` pickle next to the plugin modules.
When that file is missing or older than a plugin module, Twisted imports
every plugin module and tries to write the file again, on *every* start.
pip never writes the file (it runs no code at install time), and the
systemd unit runs relayd as an unprivileged user with ``ProtectSystem=strict``,
so the write fails and every start logs "Unable to write to plugin cache
.../dropin.cache: error number 13" and pays for the rescan.

The fix is an install step run by the user who installed the files (root,
for the unit's venv in ``/opt/relayd``), after every ``pip install``::

    /opt/relayd/.venv/bin/relayd plugin-cache

It lets Twisted write the caches (`refresh`), then proves the result is
stable: a second scan must find nothing to write, and the ``relayd``
service maker must be among the plugins twistd will see.  Anything else is
reported and the exit status is 1, so an install script stops there instead
of shipping a daemon that warns at each start.

Twisted reports cache problems only through its log (``log.msg`` for a
failed write, ``log.err`` for a plugin that fails to import), so `refresh`
listens to the global log publisher while it runs; that is the only global
it touches, for the few milliseconds of a command-line tool.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import attrs
from twisted.application.service import IServiceMaker
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.plugin import getCache, getPlugins
from twisted.python.modules import getModule
from zope.interface import implementer

#: Twisted's name for the cache file in each plugin directory.
CACHE_NAME = "dropin.cache"
#: The twistd sub-command relayd's plugin provides.
RELAYD_TAPNAME = "relayd"

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2

#: (mtime in ns, size) of a cache file, or None when there is none.
_Stamp = Optional[Tuple[int, int]]


@attrs.frozen
class CacheDirectory:
    """One plugin directory and what `refresh` did to its cache file."""

    path: str
    modules: Tuple[str, ...]
    #: "written", "up to date" or "not written" (see the report's problems).
    state: str


@attrs.frozen
class CacheReport:
    """The outcome of `refresh`: per-directory results, plugins seen, problems."""

    directories: Tuple[CacheDirectory, ...]
    tapnames: Tuple[str, ...]
    problems: Tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when every cache is written and stable and nothing was logged."""
        return not self.problems


def plugin_directories(package: ModuleType) -> Dict[str, List[str]]:
    """Map each directory of `package` that holds plugin modules to their names.

    Uses the same walk as Twisted's ``getCache`` (`twisted.python.modules`), so
    it sees exactly the directories Twisted keeps a cache file in.
    """
    dirs: Dict[str, List[str]] = {}
    for module in getModule(package.__name__).iterModules():  # type: ignore[no-untyped-call]
        dirs.setdefault(module.filePath.parent().path, []).append(module.name.rsplit(".", 1)[-1])
    return dirs


def _stamp(directory: str) -> _Stamp:
    try:
        st = os.stat(os.path.join(directory, CACHE_NAME))
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size) if stat.S_ISREG(st.st_mode) else None


@implementer(ILogObserver)
class _Collector:
    """Collects the log events emitted while it observes the global publisher."""

    def __init__(self) -> None:
        self.events: List[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def __enter__(self) -> _Collector:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


def _describe(event: LogEvent) -> str:
    text = formatEvent(event) or ""
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}: {failure.getErrorMessage()}" if text else failure.getErrorMessage()
    return text.strip() or repr(event)


def refresh(package: ModuleType) -> CacheReport:
    """Let Twisted write the plugin caches of `package`, then check they are stable.

    Pass 1 is Twisted's own ``getPlugins`` (writes stale caches, lists the
    service makers).  Pass 2 is ``getCache`` again: with fresh caches it
    must neither write nor log.  A cache that pass 2 rewrites (for example a
    file system whose timestamps are too coarse to tell the cache from the
    modules apart) would be rewritten at every start too, so it is a problem.
    """
    dirs = plugin_directories(package)
    before = {d: _stamp(d) for d in dirs}
    problems: List[str] = []
    with _Collector() as first:
        tapnames = tuple(sorted(p.tapname for p in getPlugins(IServiceMaker, package)))
    problems += [_describe(e) for e in first.events]
    written = {d: _stamp(d) for d in dirs}
    with _Collector() as second:
        getCache(package)  # type: ignore[no-untyped-call]
    after = {d: _stamp(d) for d in dirs}
    if not first.events:
        problems += [_describe(e) for e in second.events]
    for d in dirs:
        if written[d] is None and not first.events:
            problems.append(f"no {CACHE_NAME} in {d} after the scan")
        elif after[d] != written[d]:
            problems.append(f"{os.path.join(d, CACHE_NAME)} is rewritten at every scan (file timestamps too coarse?)")
    if RELAYD_TAPNAME not in tapnames:
        searched = ", ".join(getattr(package, "__path__", [])) or package.__name__
        problems.append(f"no '{RELAYD_TAPNAME}' twistd plugin found (searched {searched})")
    report = tuple(
        CacheDirectory(path=d, modules=tuple(sorted(mods)), state=_state(before[d], written[d]))
        for d, mods in sorted(dirs.items())
    )
    return CacheReport(directories=report, tapnames=tapnames, problems=tuple(problems))


def _state(before: _Stamp, after: _Stamp) -> str:
    if after is None:
        return "not written"
    return "up to date" if after == before else "written"


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="relayd plugin-cache",
        description=(
            "Write Twisted's plugin cache (dropin.cache) for this installation, as the user who installed it, "
            "so that `twistd relayd` started by a read-only service user neither rescans plugins nor logs a "
            "cache warning. Run it after every pip install/upgrade. Exit 1 if a cache cannot be written."
        ),
    )


def main(argv: Optional[List[str]] = None, package: Optional[ModuleType] = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 problem, 2 usage)."""
    try:
        _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    if package is None:
        import twisted.plugins

        package = twisted.plugins
    report = refresh(package)
    for d in report.directories:
        print(f"{os.path.join(d.path, CACHE_NAME)}: {d.state} ({len(d.modules)} plugin modules)")
    for problem in report.problems:
        print(f"relayd plugin-cache: {problem}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_PROBLEM
