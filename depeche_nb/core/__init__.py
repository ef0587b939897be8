"""Plain data types, protocols and errors: no SQLAlchemy, no I/O."""
