"""The command-line tools: ``pocketbridge-cli`` and ``pocketbridge-admin``."""
