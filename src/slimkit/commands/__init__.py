"""CLI commands, one module per capability, each with ``register(app)``."""
