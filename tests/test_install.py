"""Installing relayd the ways users do, and ``relayd plugin-cache``.

Subject: ``setup.py`` + ``pyproject.toml``, relayd/install/plugin_cache.py,
docs/operations.md's install walkthrough, etc/systemd/relayd.service.

* `PluginCacheTests`: the install step that writes Twisted's ``dropin.cache``
  (synthetic plugin packages in a temp dir; in-process, fast).
* `EditableInstallTests`: ``pip install -e .`` into a fresh venv, then
  ``twistd relayd --help`` with no ``PYTHONPATH``, from another directory.
* `DistributionTests`: ``python -m build`` gives an sdist and a wheel (built
  from that sdist); their contents; then docs/operations.md's walkthrough:
  Debian's ``/usr/bin/python3`` venv under a temp ``/opt``-like root, the
  wheel built and installed with that venv's pip (Debian's pip 23.0),
  ``relayd plugin-cache``, a service user, the unit's ``ExecStart`` run as that
  user with the unit's working directory, environment and umask, readiness
  (``READY=1`` on a ``NOTIFY_SOCKET`` and ``/readyz``), a POST, a clean
  SIGTERM, and a log with no warning, traceback or plugin-cache complaint.
* `UnitSecurityTests`: ``systemd-analyze security --offline=true`` keeps
  the unit's exposure at 1.5 or lower (``verify`` is in test_sdnotify.py).

The pip-based tests need the package index (PyPI or the configured mirror)
for the isolated build environment and, in the walkthrough, relayd's
dependencies: the same access ``scripts/bootstrap`` needs.
"""

from __future__ import annotations

import glob
import http.client
import importlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import unittest
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

from relayd import cli
from relayd.install import plugin_cache
from tests.harness import REPO_ROOT, RedisServer, free_port, to_toml, wait_for

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

#: Seconds a pip command gets (a cold index cache on a slow CI machine).
PIP_TIMEOUT = 600.0
#: Seconds the installed daemon gets to report READY=1 (imports + 2 workers on a loaded box).
READY_TIMEOUT = 60.0
#: Seconds it gets to exit after SIGTERM: the unit's shutdown budget is much
#: larger, but an idle relay drains at once.
STOP_TIMEOUT = 45.0

#: What a distribution needs from the checkout (what ``git clone`` gives).
SOURCE_FILES = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "tox.ini")
SOURCE_DIRS = ("relayd", "twisted", "etc", "docs")

UNIT_PATH = os.path.join(REPO_ROOT, "etc", "systemd", "relayd.service")
#: docs/operations.md's locations, mapped below the temp root in the walkthrough.
MAPPED_PREFIXES = ("/opt/relayd", "/etc/relayd", "/var/lib/relayd", "/run/relayd")

#: A twistd plugin module for synthetic plugin packages: one service maker.
PLUGIN_SOURCE = """
from twisted.application.service import ServiceMaker

maker = ServiceMaker({tapname!r}, "relayd.tap", "test plugin", {tapname!r})
"""


def copy_source(dest: str) -> str:
    """Copy the files a clone of the repository has (minus tests, venv, caches) to `dest`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache", "*.egg-info")
    os.makedirs(dest, exist_ok=True)
    for name in SOURCE_FILES:
        shutil.copy2(os.path.join(REPO_ROOT, name), dest)
    for name in SOURCE_DIRS:
        shutil.copytree(os.path.join(REPO_ROOT, name), os.path.join(dest, name), ignore=ignore)
    return dest


def run(argv: list[str], timeout: float = PIP_TIMEOUT, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, output captured as text (stderr merged into stdout)."""
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw)


def clean_env(**extra: str) -> dict[str, str]:
    """An environment without this test run's PYTHONPATH / venv, as a new shell or systemd gives."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env


def debian_python() -> str | None:
    """Debian's ``/usr/bin/python3`` if it can make venvs, else the ``python3`` on PATH that can, else None."""
    for candidate in ("/usr/bin/python3", shutil.which("python3")):
        if candidate and os.access(candidate, os.X_OK):
            if run([candidate, "-c", "import venv, ensurepip"], timeout=60).returncode == 0:
                return candidate
    return None


# --------------------------------------------------------------------------
# relayd plugin-cache
# --------------------------------------------------------------------------


class PluginCacheTests(unittest.TestCase):
    """``relayd plugin-cache`` writes each plugin directory's cache once and proves it stable."""

    def make_package(self, plugins: Mapping[str, str]) -> Any:
        """A fresh importable plugin package in a temp dir holding `plugins` (module name -> source)."""
        root = tempfile.mkdtemp(prefix="relayd-plugins-")
        self.addCleanup(shutil.rmtree, root, True)
        name = "relayd_test_plugins_" + uuid.uuid4().hex[:12]
        pkg = os.path.join(root, name)
        os.mkdir(pkg)
        open(os.path.join(pkg, "__init__.py"), "w").close()
        for module, source in plugins.items():
            with open(os.path.join(pkg, module + ".py"), "w") as f:
                f.write(source)
        sys.path.insert(0, root)
        self.addCleanup(sys.path.remove, root)
        self.addCleanup(lambda: [sys.modules.pop(m) for m in list(sys.modules) if m.startswith(name)])
        importlib.invalidate_caches()
        package = importlib.import_module(name)
        self.cache_path = os.path.join(pkg, plugin_cache.CACHE_NAME)
        return package

    def test_writes_the_cache_then_finds_it_up_to_date(self) -> None:
        """First run writes dropin.cache and finds the relayd plugin; the second only confirms it."""
        package = self.make_package({"relayd_plugin": PLUGIN_SOURCE.format(tapname="relayd")})
        first = plugin_cache.refresh(package)
        self.assertEqual(first.problems, ())
        self.assertEqual(first.tapnames, ("relayd",))
        self.assertEqual([d.state for d in first.directories], ["written"])
        self.assertTrue(os.path.isfile(self.cache_path))
        second = plugin_cache.refresh(package)
        self.assertTrue(second.ok, second.problems)
        self.assertEqual([d.state for d in second.directories], ["up to date"])

    def test_unwritable_cache_fails(self) -> None:
        """A cache that cannot be written is a problem (exit 1) naming the path, not a log line lost at start."""
        package = self.make_package({"relayd_plugin": PLUGIN_SOURCE.format(tapname="relayd")})
        os.mkdir(self.cache_path)  # any write fails, even as root
        report = plugin_cache.refresh(package)
        self.assertFalse(report.ok)
        self.assertEqual([d.state for d in report.directories], ["not written"])
        self.assertTrue(any("Unable to write to plugin cache" in p and self.cache_path in p for p in report.problems))
        self.assertEqual(plugin_cache.main([], package=package), plugin_cache.EXIT_PROBLEM)

    def test_missing_relayd_plugin_fails(self) -> None:
        """Caches alone are not enough: twistd must see a ``relayd`` service maker."""
        package = self.make_package({"other_plugin": PLUGIN_SOURCE.format(tapname="other")})
        report = plugin_cache.refresh(package)
        self.assertEqual(report.tapnames, ("other",))
        self.assertTrue(any("no 'relayd' twistd plugin" in p for p in report.problems), report.problems)

    def test_broken_plugin_module_fails(self) -> None:
        """A plugin module that cannot be imported is reported (Twisted only logs it)."""
        package = self.make_package(
            {
                "relayd_plugin": PLUGIN_SOURCE.format(tapname="relayd"),
                "broken_plugin": "raise ImportError('no such thing')\n",
            }
        )
        report = plugin_cache.refresh(package)
        self.assertTrue(any("no such thing" in p for p in report.problems), report.problems)

    def test_cli_dispatch(self) -> None:
        """``relayd plugin-cache --help`` reaches the command; unknown options are usage errors."""
        self.assertEqual(cli.main(["plugin-cache", "--help"]), 0)
        self.assertEqual(cli.main(["plugin-cache", "--no-such-option"]), plugin_cache.EXIT_USAGE)


# --------------------------------------------------------------------------
# pip install -e .
# --------------------------------------------------------------------------


class EditableInstallTests(unittest.TestCase):
    """``pip install -e .`` in setuptools' default editable mode gives a working ``twistd relayd``."""

    def test_editable_install_runs_twistd_relayd(self) -> None:
        """Fresh venv, ``pip install -e SRC``, then ``twistd relayd --help`` from elsewhere without PYTHONPATH.

        relayd's dependencies come from this test run's environment (a ``.pth``
        file in the new venv) so that only relayd itself is installed; the
        install uses pip's default build isolation and editable mode.  A new
        module added to the source afterwards is importable: the install is
        really editable.
        """
        tmp = tempfile.mkdtemp(prefix="relayd-editable-")
        self.addCleanup(shutil.rmtree, tmp, True)
        src = copy_source(os.path.join(tmp, "src"))
        venv = os.path.join(tmp, "venv")
        made = run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
        self.assertEqual(made.returncode, 0, made.stdout)
        python = os.path.join(venv, "bin", "python")
        site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=60)
        purelib = site.stdout.strip()
        deps = sorted({p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)})
        with open(os.path.join(purelib, "relayd-test-deps.pth"), "w") as f:
            f.write("\n".join(deps) + "\n")
        pip = [python, "-m", "pip", "--disable-pip-version-check"]
        installed = run([*pip, "install", "--no-deps", "-e", src], cwd=tmp, env=clean_env())
        self.assertEqual(installed.returncode, 0, installed.stdout)

        twistd = [python, "-c", "from twisted.scripts.twistd import run; run()"]
        helped = run([*twistd, "relayd", "--help"], cwd=tmp, env=clean_env(), timeout=120)
        self.assertEqual(helped.returncode, 0, helped.stdout)
        self.assertIn("relayd --config PATH", helped.stdout)

        with open(os.path.join(src, "relayd", "editable_probe.py"), "w") as f:
            f.write("WHERE = __file__\n")
        probe = run([python, "-c", "import relayd.editable_probe as p; print(p.WHERE)"], cwd=tmp, env=clean_env())
        self.assertEqual(probe.stdout.strip(), os.path.join(src, "relayd", "editable_probe.py"), probe.stdout)


# --------------------------------------------------------------------------
# sdist + wheel, and the operations walkthrough
# --------------------------------------------------------------------------


class NotifySocket:
    """A ``NOTIFY_SOCKET`` datagram socket another user may send to (systemd's side of Type=notify)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def received(self, key: str) -> bool:
        """True once a datagram carrying ``key=...`` arrived."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))
        return any(key in m for m in self.messages)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def unit_settings(path: str) -> dict[str, list[str]]:
    """The [Service] settings of a unit file: name -> values in order (systemd's repeated keys)."""
    settings: dict[str, list[str]] = {}
    section = None
    with open(path) as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]":
                key, _, value = line.partition("=")
                settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def json_log_lines(text: str) -> Iterator[dict[str, Any]]:
    """Each line of a JSON-lines log as an object; a line that is not JSON fails the test run."""
    for line in text.splitlines():
        if line.strip():
            yield json.loads(line)


class DistributionTests(unittest.TestCase):
    """``python -m build`` output, and docs/operations.md followed with that wheel."""

    tmp: str
    src: str
    dist: str
    build_output: str

    @classmethod
    def setUpClass(cls) -> None:
        """Build the sdist and, from it, the wheel once (pip's isolated build env, as a user would)."""
        cls.tmp = tempfile.mkdtemp(prefix="relayd-dist-")
        cls.src = copy_source(os.path.join(cls.tmp, "src"))
        cls.dist = os.path.join(cls.tmp, "dist")
        built = run([sys.executable, "-m", "build", "--outdir", cls.dist, cls.src], env=clean_env())
        if built.returncode != 0:
            shutil.rmtree(cls.tmp, True)
            raise AssertionError("python -m build failed:\n" + built.stdout[-4000:])
        cls.build_output = built.stdout

    @classmethod
    def tearDownClass(cls) -> None:
        """Remove the build directory."""
        shutil.rmtree(cls.tmp, True)

    def only(self, pattern: str) -> str:
        """The one file in the dist directory matching `pattern`."""
        found = glob.glob(os.path.join(self.dist, pattern))
        self.assertEqual(len(found), 1, found)
        return found[0]

    def test_wheel_carries_the_plugin_and_no_twisted_package_files(self) -> None:
        """The wheel has relayd, its CLI entry point and the twistd plugin, and never Twisted's ``__init__``s."""
        with zipfile.ZipFile(self.only("relayd-*-py3-none-any.whl")) as whl:
            names = set(whl.namelist())
            entry_points = whl.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        self.assertIn("twisted/plugins/relayd_plugin.py", names)
        self.assertIn("relayd/install/plugin_cache.py", names)
        self.assertIn("relayd/tap.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertFalse([n for n in names if n.endswith("dropin.cache")])
        self.assertIn("relayd = relayd.cli:main", entry_points)
        self.assertNotIn("legacy", self.build_output.lower())

    def test_sdist_carries_what_an_operator_needs(self) -> None:
        """The sdist has the code, the plugin, pyproject.toml, the example config, schemas, units and docs."""
        with tarfile.open(self.only("relayd-*.tar.gz")) as sdist:
            names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
        for expected in (
            "pyproject.toml",
            "setup.py",
            "twisted/plugins/relayd_plugin.py",
            "relayd/tap.py",
            "etc/relayd.conf",
            "etc/schemas/increment.json",
            "etc/systemd/relayd.service",
            "docs/operations.md",
        ):
            self.assertIn(expected, names)

    def test_operations_walkthrough(self) -> None:
        """docs/operations.md as far as this machine allows (no systemd as PID 1): see the module docstring."""
        if os.geteuid() != 0:
            self.skipTest("the walkthrough creates a service user and runs as it: needs root")
        for tool in ("useradd", "userdel"):
            if not shutil.which(tool):
                self.skipTest(f"{tool} not found (Debian: apt-get install passwd)")
        python3 = debian_python()
        if python3 is None:
            self.skipTest("no python3 with venv/ensurepip (Debian: apt-get install python3-venv)")
        if python3 != "/usr/bin/python3":
            sys.stderr.write(f"walkthrough: /usr/bin/python3 unusable, using {python3}\n")
        unit = unit_settings(UNIT_PATH)

        root = tempfile.mkdtemp(prefix="relayd-walk-")
        self.addCleanup(shutil.rmtree, root, True)
        os.chmod(root, 0o755)  # mkdtemp's 0700 would hide everything from the service user

        def mapped(path: str) -> str:
            for prefix in MAPPED_PREFIXES:
                if path == prefix or path.startswith(prefix + "/"):
                    return root + path
            return path

        # The service user (a unique name: several suites may run on one machine).
        user = "relayd-t" + uuid.uuid4().hex[:8]
        home = mapped("/var/lib/relayd")
        added = run(
            ["useradd", "--system", "--home-dir", home, "--no-create-home", "--shell", "/usr/sbin/nologin", user],
            timeout=60,
        )
        self.assertEqual(added.returncode, 0, added.stdout)
        self.addCleanup(run, ["userdel", user], 60)
        uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
        self.assertEqual(unit["User"], ["relayd"])
        self.assertEqual(unit["Group"], ["relayd"])

        # The venv in /opt/relayd, the wheel installed into it, the plugin cache written as root.
        venv = mapped("/opt/relayd/.venv")
        made = run([python3, "-m", "venv", venv], timeout=300)
        self.assertEqual(made.returncode, 0, made.stdout)
        # docs/operations.md builds the wheel with that venv's pip (Debian's pip 23.0): no legacy path.
        wheels = os.path.join(root, "dist")
        built = run([os.path.join(venv, "bin", "pip"), "wheel", "--no-deps", "-w", wheels, self.src], env=clean_env())
        self.assertEqual(built.returncode, 0, built.stdout)
        self.assertNotIn("legacy", built.stdout.lower())
        self.assertNotIn("DEPRECATION", built.stdout)
        (wheel,) = glob.glob(os.path.join(wheels, "relayd-*-py3-none-any.whl"))
        installed = run([os.path.join(venv, "bin", "pip"), "install", wheel], env=clean_env())
        self.assertEqual(installed.returncode, 0, installed.stdout)
        self.assertNotIn("DEPRECATION", installed.stdout)

        as_user: dict[str, Any] = {"user": uid, "group": gid, "extra_groups": [], "env": clean_env()}
        probe = textwrap.dedent(
            """
            import sys
            from twisted.python import log
            log.startLogging(sys.stdout)
            from twisted.application.service import IServiceMaker
            from twisted.plugin import getPlugins
            print(sorted(p.tapname for p in getPlugins(IServiceMaker)))
            """
        )
        before = run([os.path.join(venv, "bin", "python"), "-c", probe], timeout=120, **as_user)
        self.assertIn("Unable to write to plugin cache", before.stdout)  # the problem this step solves
        cached = run([os.path.join(venv, "bin", "relayd"), "plugin-cache"], timeout=120, env=clean_env())
        self.assertEqual(cached.returncode, 0, cached.stdout)
        after = run([os.path.join(venv, "bin", "python"), "-c", probe], timeout=120, **as_user)
        self.assertNotIn("plugin cache", after.stdout)
        self.assertIn("'relayd'", after.stdout)
        checked = run([os.path.join(venv, "bin", "relayd"), "plugin-cache"], timeout=120, **as_user)
        self.assertEqual(checked.returncode, 0, checked.stdout)
        self.assertIn("up to date", checked.stdout)

        # /etc/relayd: the config (0640, group relayd) and the schemas.
        redis = RedisServer(self)  # started (and waited for) by the constructor

        def install(path: str, mode: int) -> None:  # install -m MODE -g relayd
            os.chown(path, 0, gid)
            os.chmod(path, mode)

        etc = mapped("/etc/relayd")
        os.makedirs(os.path.join(etc, "schemas"))
        install(etc, 0o750)
        install(os.path.join(etc, "schemas"), 0o750)
        for schema in glob.glob(os.path.join(REPO_ROOT, "etc", "schemas", "*.json")):
            install(shutil.copy(schema, os.path.join(etc, "schemas")), 0o640)
        with open(os.path.join(REPO_ROOT, "etc", "relayd.conf"), "rb") as f:
            conf = tomllib.load(f)
        routes = conf.pop("route")
        for route in routes:
            if "schema" in route:
                route["schema"] = os.path.join(etc, "schemas", os.path.basename(route["schema"]))
        port, admin = free_port(), free_port()
        conf["server"].update(
            listen=f"tcp:{port}:interface=127.0.0.1", admin=f"tcp:{admin}:interface=127.0.0.1", workers="auto"
        )
        conf["redis"]["url"] = redis.url
        conf["spool"]["dir"] = mapped("/var/lib/relayd/spool/store")
        config_path = os.path.join(etc, "relayd.conf")
        with open(config_path, "w") as f:
            f.write(to_toml(conf, routes))
        install(config_path, 0o640)

        # What systemd would do: StateDirectory, RuntimeDirectory, WorkingDirectory, Environment, UMask.
        state_dir = mapped("/var/lib/" + unit["StateDirectory"][0])
        runtime_dir = mapped("/run/" + unit["RuntimeDirectory"][0])
        for path, mode in (
            (state_dir, unit["StateDirectoryMode"][0]),
            (runtime_dir, unit["RuntimeDirectoryMode"][0]),
        ):
            os.makedirs(path)
            os.chown(path, uid, gid)
            os.chmod(path, int(mode, 8))
        notify = NotifySocket(os.path.join(root, "notify"))
        self.addCleanup(notify.close)
        env = clean_env(
            NOTIFY_SOCKET=notify.path,
            RUNTIME_DIRECTORY=runtime_dir,
            STATE_DIRECTORY=state_dir,
            HOME=home,
            USER=user,
            LOGNAME=user,
        )
        for assignment in unit.get("Environment", []):
            for word in shlex.split(assignment):
                k, _, v = word.partition("=")
                env[k] = v
        argv = [mapped(word) for word in shlex.split(unit["ExecStart"][0])]
        self.assertEqual(argv[0], os.path.join(venv, "bin", "twistd"))
        self.assertEqual(argv[-1], config_path)

        log_path = os.path.join(root, "journal.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=mapped(unit["WorkingDirectory"][0]),
                env=env,
                user=uid,
                group=gid,
                extra_groups=[],
                umask=int(unit["UMask"][0], 8),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))

        def journal() -> str:
            with open(log_path, errors="replace") as f:
                return f.read()

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"relayd exited {proc.returncode}:\n{journal()[-4000:]}")
            return notify.received("READY")

        wait_for(ready, READY_TIMEOUT, "READY=1 on NOTIFY_SOCKET")
        conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
        conn.request("GET", "/readyz")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()

        body = json.dumps({"message": "installed by the walkthrough", "shop": "a23m07b23"})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/leads", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        conn.close()
        self.assertEqual(resp.status, 200, answer)
        items = wait_for(lambda: redis.items("leads"), 10.0, "the lead in Redis")
        self.assertEqual([json.loads(i)["id"] for i in items], [answer["id"]])

        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail("relayd did not exit after SIGTERM:\n" + journal()[-4000:])
        self.assertTrue(notify.received("STOPPING"))
        text = journal()
        self.assertEqual(code, 0, text[-4000:])

        events = list(json_log_lines(text))  # stray stderr text (a warning, a traceback) is not JSON: fails here
        self.assertTrue(events)
        noisy = [e for e in events if e.get("level") not in ("debug", "info")]
        self.assertEqual(noisy, [])
        for needle in ("Traceback", "dropin.cache", "plugin cache", "Warning"):
            self.assertNotIn(needle, text)
        # Files the service created follow the unit's UMask (0027): nothing world-readable.
        for dirpath, dirnames, filenames in os.walk(state_dir):
            for name in dirnames + filenames:
                self.assertEqual(os.stat(os.path.join(dirpath, name)).st_mode & 0o007, 0, name)


# --------------------------------------------------------------------------
# systemd-analyze security
# --------------------------------------------------------------------------


@unittest.skipUnless(shutil.which("systemd-analyze"), "systemd-analyze not installed")
class UnitSecurityTests(unittest.TestCase):
    """The unit's hardening does not regress."""

    #: ``systemd-analyze security``'s exposure score of etc/systemd/relayd.service (0 best, 10 worst).
    MAX_EXPOSURE = 1.5

    def test_exposure(self) -> None:
        """``systemd-analyze security --offline=true`` scores the unit at 1.5 or better."""
        tmp = tempfile.mkdtemp(prefix="relayd-unit-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "relayd.service")
        with open(UNIT_PATH) as f:
            text = f.read().replace(
                "/opt/relayd/.venv/bin/twistd", os.path.join(os.path.dirname(sys.executable), "twistd")
            )
        with open(path, "w") as f:
            f.write(text)
        result = run(["systemd-analyze", "security", "--offline=true", "--no-pager", path], timeout=60)
        match = re.search(r"Overall exposure level for relayd\.service: ([0-9.]+)", result.stdout)
        self.assertIsNotNone(match, result.stdout)
        assert match is not None
        self.assertLessEqual(float(match.group(1)), self.MAX_EXPOSURE, result.stdout)
