"""Install-time steps: what an installer runs once so that the daemon starts clean."""
