"""HTTP ingest: guards, routes, body validation, auth, rate limits, problem documents."""
