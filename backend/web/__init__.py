"""What every HTTP response and the operator see: security headers and identities, logs,
metrics, and the browser client's files (assets)."""
