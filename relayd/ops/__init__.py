"""Operations: admin endpoints, Prometheus metrics, structured logs."""
