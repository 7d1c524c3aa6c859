"""Packaging for relayd, a durable HTTP-to-Redis relay on Twisted."""

from setuptools import find_packages, setup

setup(
    name="relayd",
    version="0.1.0",
    description="Durable HTTP-to-Redis relay: fast acks, bounded memory, no lost messages",
    python_requires=">=3.9",  # 3.11 is the target; 3.9 keeps Debian's pypy3 open
    packages=find_packages(include=["relayd", "relayd.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/relayd_plugin.py"]},
    install_requires=[
        "twisted[tls]>=24.7",  # request-smuggling / pipelining CVEs fixed in 24.7
        "klein>=23.5",
        "txredisapi>=1.4.10",
        "treq>=23.11",
        "ujson>=5.12",
        "attrs>=23.1",
        # prometheus-client: the standard text exposition format and histogram
        # maths, instead of a hand-written exporter.
        "prometheus-client>=0.20",
        # fastjsonschema compiles a JSON Schema to Python code once at config
        # load: ~10x faster per message than an interpreted validator.
        "fastjsonschema>=2.19",
        # crc32c: hardware-accelerated CRC32C for spool records.
        "crc32c>=2.4",
        'tomli>=2.0; python_version < "3.11"',
    ],
    extras_require={
        # redis-py: the example request/reply worker (examples/) that the tests run
        # websocket-client: speaks Chromium's DevTools protocol for the fan-out browser test
        # (a hand-written RFC 6455 client would be ~150 lines of framing to get right)
        "test": ["hypothesis>=6.100", "pytest>=8", "treq>=23.11", "redis>=5", "websocket-client>=1.6"],
        "dev": ["ruff>=0.6", "mypy>=1.10", "mypy-zope>=1.0", "tox>=4"],
    },
    entry_points={"console_scripts": ["relayd = relayd.cli:main"]},
)
