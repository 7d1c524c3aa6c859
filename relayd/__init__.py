"""relayd: a durable HTTP-to-Redis relay.

Data path, one module per step::

    ingest (HTTP) -> validation -> buffer -> forwarder -> redis
"""
