"""Request/reply through Redis: private reply lists per process, matched by request id."""
