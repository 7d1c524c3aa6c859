"""Config parsing: valid configs round-trip, invalid ones name the key."""

from __future__ import annotations

import os
import tempfile
import unittest

from hypothesis import given
from hypothesis import strategies as st

from relayd.config import ConfigError, config_from_string, load_config, parse_size
from relayd.ingest.validation import compile_schema_file
from tests.strategies import configs, sizes

MINIMAL = '[[route]]\npath = "/leads"\nlist = "leads"\n'

CONTRACT_EXAMPLE = """
[server]
listen = "tcp:8080"
admin  = "tcp:9090:interface=127.0.0.1"
workers = 1

[redis]
url = "redis://127.0.0.1:6379/0"

[spool]
dir = "var/spool"
max_bytes = "1GiB"
fsync = "batch"

[[route]]
path = "/leads"
list = "leads"
ack = "stored"
schema = "etc/schemas/lead.json"
"""


class ConfigFromStringTests(unittest.TestCase):
    """`config_from_string` is pure and strict."""

    @given(configs())
    def test_valid_configs_round_trip(self, case):
        """Every generated valid config parses to exactly the values written."""
        text, expected = case
        config = config_from_string(text)
        self.assertEqual(config.redis.port, expected["port"])
        self.assertEqual(config.redis.db, expected["db"])
        self.assertEqual(config.server.workers, expected["workers"])
        self.assertEqual(config.spool.max_bytes, expected["spool_bytes"])
        self.assertEqual(config.spool.fsync, expected["fsync"])
        self.assertEqual(
            [(r.path, r.list, r.ack, r.format, r.max_body) for r in config.routes], expected["routes"]
        )

    def test_contract_example_parses(self):
        """The config in the product contract is valid, paths resolved against base_dir."""
        config = config_from_string(CONTRACT_EXAMPLE, base_dir="/srv/relayd")
        self.assertEqual(config.routes[0].schema, "/srv/relayd/etc/schemas/lead.json")
        self.assertEqual(config.spool.dir, "/srv/relayd/var/spool")
        self.assertEqual(config.spool.max_bytes, 1024**3)
        self.assertEqual((config.redis.host, config.redis.port, config.redis.db), ("127.0.0.1", 6379, 0))

    def test_listen_backlog(self):
        """A listen string without a backlog gets [server] backlog (Twisted's own default is 50);
        one that sets it, and socket activation, are left alone."""
        from relayd.config import with_backlog

        self.assertEqual(
            config_from_string('[server]\nlisten = "tcp:80"\nbacklog = 4096\n' + MINIMAL).server.listen,
            "tcp:80:backlog=4096",
        )
        self.assertEqual(with_backlog("tcp:80:backlog=5", 1024), "tcp:80:backlog=5")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0", 1024), "systemd:domain=INET:index=0")
        self.assertEqual(with_backlog("unix:/run/r.sock", 64), "unix:/run/r.sock:backlog=64")
        with self.assertRaises(ConfigError):
            config_from_string("[server]\nbacklog = 0\n" + MINIMAL)

    def test_defaults(self):
        """A config with only a route gets the documented defaults."""
        config = config_from_string(MINIMAL)
        self.assertEqual(config.server.listen, "tcp:8080:backlog=1024")
        self.assertEqual(config.server.backlog, 1024)
        self.assertEqual(config.server.admin, "tcp:9090:interface=127.0.0.1")
        self.assertEqual(config.routes[0].ack, "stored")
        self.assertEqual(config.routes[0].format, "envelope")
        self.assertEqual(config.routes[0].max_body, 1024 * 1024)

    @given(
        st.sampled_from(["server", "redis", "spool", "buffer"]),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
    )
    def test_unknown_keys_are_named(self, table, key):
        """An unknown key in any table is rejected with `table.key` in the message."""
        known = {
            "server": {"listen", "admin", "workers", "shutdown_timeout", "idle_timeout"},
            "redis": {"url", "reply_timeout", "connect_timeout", "batch_messages", "batch_bytes", "max_in_flight"},
            "spool": {"dir", "max_bytes", "fsync"},
            "buffer": {"max_messages", "max_bytes", "ack_timeout"},
        }
        if key in known[table]:
            return
        with self.assertRaises(ConfigError) as e:
            config_from_string(f"[{table}]\n{key} = 1\n" + MINIMAL)
        self.assertIn(f"{table}.{key}", str(e.exception))

    def test_unknown_route_key_is_named(self):
        """A typo in a route names the route index and key."""
        with self.assertRaises(ConfigError) as e:
            config_from_string(MINIMAL + 'acks = "stored"\n')
        self.assertIn("route[0].acks", str(e.exception))

    def test_wrong_types_are_named(self):
        """Wrong value types name the key and the expected type."""
        cases = {
            '[server]\nworkers = "two"\n': "server.workers",
            "[server]\nlisten = 8080\n": "server.listen",
            "[redis]\nreply_timeout = \"5s\"\n": "redis.reply_timeout",
            '[spool]\nmax_bytes = "lots"\n': "spool.max_bytes",
            '[spool]\nfsync = "sometimes"\n': "spool.fsync",
            "[server]\nworkers = true\n": "server.workers",
            "[buffer]\nmax_messages = 0\n": "buffer.max_messages",
            '[redis]\nurl = "http://x"\n': "redis.url",
        }
        for text, key in cases.items():
            with self.subTest(key=key), self.assertRaises(ConfigError) as e:
                config_from_string(text + MINIMAL)
            self.assertIn(key, str(e.exception))
        for route, key in {
            'path = "leads"\nlist = "x"\n': "route[0].path",
            'path = "/x"\nlist = "x"\nack = "maybe"\n': "route[0].ack",
            'path = "/x"\nlist = "x"\nmax_body = -1\n': "route[0].max_body",
            'path = "/x"\n': "route[0].list",
        }.items():
            with self.subTest(key=key), self.assertRaises(ConfigError) as e:
                config_from_string("[[route]]\n" + route)
            self.assertIn(key, str(e.exception))

    def test_routes_required_and_unique(self):
        """No route, or two routes on one path, is an error."""
        with self.assertRaises(ConfigError):
            config_from_string("[server]\n")
        with self.assertRaises(ConfigError) as e:
            config_from_string(MINIMAL + MINIMAL)
        self.assertIn("route[1].path", str(e.exception))

    def test_not_toml(self):
        """Syntax errors are ConfigErrors, not tracebacks."""
        with self.assertRaises(ConfigError):
            config_from_string("[server\n")

    def test_redis_url_forms(self):
        """Credentials, IPv6 hosts and db numbers are read from the URL."""
        c = config_from_string('[redis]\nurl = "redis://u:p%40ss@[::1]:6380/3"\n' + MINIMAL).redis
        self.assertEqual((c.username, c.password, c.host, c.port, c.db), ("u", "p@ss", "::1", 6380, 3))
        self.assertNotIn("p%40ss", repr(c))
        self.assertNotIn("p@ss", repr(c))

    @given(sizes())
    def test_parse_size(self, case):
        """Sizes with binary and decimal units parse to bytes."""
        text, expected = case
        self.assertEqual(parse_size(text, "k"), expected)


class LoadConfigTests(unittest.TestCase):
    """`load_config` adds the checks that need the file system."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(os.system, f"rm -rf {self.dir}")

    def write(self, text):
        path = os.path.join(self.dir, "relayd.conf")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_missing_schema_file(self):
        """A route naming a schema file that does not exist is rejected by key."""
        path = self.write(f'[spool]\ndir = "{self.dir}/spool"\n' + MINIMAL + 'schema = "/nonexistent.json"\n')
        with self.assertRaises(ConfigError) as e:
            load_config(path, compile_schema_file)
        self.assertIn("route[0].schema", str(e.exception))

    def test_unwritable_spool_dir(self):
        """A spool dir that cannot be created is rejected by key."""
        blocker = os.path.join(self.dir, "file")
        open(blocker, "w").close()
        path = self.write(f'[spool]\ndir = "{blocker}/spool"\n' + MINIMAL)
        with self.assertRaises(ConfigError) as e:
            load_config(path, compile_schema_file)
        self.assertIn("spool.dir", str(e.exception))

    def test_default_config_loads(self):
        """The shipped etc/relayd.conf is valid (from the repository root)."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cwd = os.getcwd()
        os.chdir(root)
        try:
            loaded = load_config("etc/relayd.conf", compile_schema_file)
            config, validators = loaded.config, loaded.validators
        finally:
            os.chdir(cwd)
        self.assertIn("/increments", validators)
        self.assertEqual(config.routes[0].path, "/leads")
