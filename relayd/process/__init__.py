"""Processes: the supervisor of N workers, the worker entry point, systemd notify."""
