"""Security: TLS helpers (and, to come, authentication, RBAC, audit and model protection)."""
