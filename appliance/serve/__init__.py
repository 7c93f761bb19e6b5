"""Serving: the vLLM command line, foreground runs, the systemd service, runtime adapters."""
