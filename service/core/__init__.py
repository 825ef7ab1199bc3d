"""Service-wide configuration (one pydantic-settings `Settings`)."""
