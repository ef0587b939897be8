"""PostgreSQL plumbing: connections, the embedded server, schema DDL, locks, notifications."""
