"""Packaging for relayd, a durable HTTP-to-Redis relay on Twisted."""

from setuptools import find_packages, setup

setup(
    name="relayd",
    version="0.1.0",
    description="Durable HTTP-to-Redis relay: fast acks, bounded memory, no lost messages",
    python_requires=">=3.10",  # 3.11 is the target; ujson>=5.12 and current Twisted need 3.10
    # The checkout root is the import root of both relayd/ and the plugin in
    # twisted/plugins/ (no __init__.py there: Twisted's plugin directory is
    # found by scanning sys.path).  Saying so explicitly makes setuptools'
    # default editable mode put the checkout on sys.path (a static path entry)
    # instead of an import hook that Twisted's plugin scan cannot see: then
    # `pip install -e .` gives a working `twistd relayd`.
    package_dir={"": "."},
    packages=find_packages(include=["relayd", "relayd.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/relayd_plugin.py"]},
    install_requires=[
        "twisted[tls]>=24.7",  # request-smuggling / pipelining CVEs fixed in 24.7
        "klein>=23.5",
        "txredisapi>=1.4.10",
        # hiredis: txredisapi's C reply parser; its pure-Python one waits a reactor
        # turn per bulk string (an XREAD of 1,000 entries took seconds under load).
        "hiredis>=2.0",
        "treq>=23.11",
        "ujson>=5.12",
        "attrs>=23.1",
        # prometheus-client: the standard text exposition format and histogram
        # maths, instead of a hand-written exporter.
        "prometheus-client>=0.20",
        # jsonschema-rs: every draft users write (4, 6, 7, 2019-09, 2020-12),
        # passes the official test suite, ~5x faster per message than
        # fastjsonschema (drafts 4-7 only), and lets relayd resolve $refs
        # offline; 0.61 has the offline/retriever/registry API relayd uses.
        "jsonschema-rs>=0.61",
        # crc32c: hardware-accelerated CRC32C for spool records.
        "crc32c>=2.4",
        'tomli>=2.0; python_version < "3.11"',  # tomllib is 3.11+
    ],
    extras_require={
        # psycopg 3 (binary wheel): the maintained PostgreSQL driver; runs on a
        # dedicated thread for the optional [[counter]] postgres sink.
        "postgres": ["psycopg[binary]>=3.1"],
        "test": [
            "hypothesis>=6.100",
            "pytest>=8",
            "treq>=23.11",
            # pyyaml: the ops-kit tests read etc/prometheus/*.yml (rule and
            # alert names, expressions, annotations); YAML is not parsed by hand.
            "pyyaml>=6.0",
            # redis-py: the example request/reply worker (examples/) that the tests run
            "redis>=5",
            # standardwebhooks: the spec's reference verifier checks our signatures
            # (a hand-written verifier would only agree with our own signer).
            "standardwebhooks>=1.0",
            # websocket-client: speaks Chromium's DevTools protocol for the fan-out browser
            # test (a hand-written RFC 6455 client would be ~150 lines of framing to get right)
            "websocket-client>=1.6",
            # build: the standard PEP 517 front end, so tests build the sdist and the
            # wheel exactly as a packager does (wheel from the sdist).
            "build>=1.0",
            # psycopg: the counters' PostgreSQL sink tests (a private server per test)
            "psycopg[binary]>=3.1",
        ],
        "dev": ["ruff>=0.6", "mypy>=1.10", "mypy-zope>=1.0", "tox>=4"],
    },
    entry_points={"console_scripts": ["relayd = relayd.cli:main"]},
)
