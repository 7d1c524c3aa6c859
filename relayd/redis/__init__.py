"""Talking to Redis: a reconnecting, binary-safe client."""
