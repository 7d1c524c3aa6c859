"""What a missing plugin cache costs each start: ``python bench/plugin_cache.py [--runs N]``.

``twistd`` looks up its sub-commands with ``getPlugins(IServiceMaker)``.  With
a valid ``dropin.cache`` it unpickles one file; without one it imports every
plugin module and tries to write the cache again, which a read-only service
user cannot, so it pays that at every start (relayd plugin-cache fixes it).

This script copies the installed ``twisted/plugins`` modules (Twisted's own
and relayd's) into a temporary plugin package and times, in fresh
interpreters, the plugin lookup twistd does:

* ``cached``: a valid cache (what ``relayd plugin-cache`` leaves);
* ``uncached``: a cache that cannot be written (a directory in its place,
  like the read-only service user's EACCES): every run rescans.

It prints the median per run of each and the ratio (uncached / cached), both
measured in the same run.  Times include interpreter start-up and
``import twisted.plugin`` (the same in both), so the ratio understates the
lookup's own difference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import twisted.plugins

PACKAGE = "bench_plugins"
LOOKUP = (
    "import {pkg} as p\n"
    "from twisted.application.service import IServiceMaker\n"
    "from twisted.plugin import getPlugins\n"
    "names = sorted(m.tapname for m in getPlugins(IServiceMaker, p))\n"
    "assert 'relayd' in names, names\n"
)


def make_package(root: str) -> str:
    """Copy every installed plugin module into ``root/bench_plugins``; return the cache path."""
    pkg = os.path.join(root, PACKAGE)
    os.mkdir(pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    for directory in twisted.plugins.__path__:
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            if name.endswith(".py") and name != "__init__.py":
                shutil.copy(os.path.join(directory, name), pkg)
    return os.path.join(pkg, "dropin.cache")


def time_runs(root: str, runs: int) -> list[float]:
    """Wall-clock seconds of `runs` fresh interpreters doing twistd's plugin lookup."""
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = LOOKUP.format(pkg=PACKAGE)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    """Run both cases interleaved (so machine noise hits both alike) and print the medians and ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    cached_root = tempfile.mkdtemp(prefix="bench-plugins-cached-")
    uncached_root = tempfile.mkdtemp(prefix="bench-plugins-uncached-")
    try:
        make_package(cached_root)
        os.mkdir(make_package(uncached_root))  # the cache can never be written
        time_runs(cached_root, 1)  # writes the valid cache; warms the OS caches
        cached: list[float] = []
        uncached: list[float] = []
        for _ in range(args.runs):
            cached += time_runs(cached_root, 1)
            uncached += time_runs(uncached_root, 1)
        modules = len([n for n in os.listdir(os.path.join(cached_root, PACKAGE)) if n.endswith(".py")]) - 1
        c, u = statistics.median(cached), statistics.median(uncached)
        print(f"plugin modules: {modules}; runs per case: {args.runs}; python {sys.version.split()[0]}")
        print(f"cached   (valid dropin.cache):        median {c * 1000:7.1f} ms per start")
        print(f"uncached (cache not writable):        median {u * 1000:7.1f} ms per start")
        print(f"ratio uncached / cached: {u / c:.2f}  (difference {1000 * (u - c):.1f} ms per start)")
    finally:
        shutil.rmtree(cached_root, True)
        shutil.rmtree(uncached_root, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
