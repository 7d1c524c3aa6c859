"""Messages on their way out of the process: buffer, delivery to Redis, disk spillover, replay."""
