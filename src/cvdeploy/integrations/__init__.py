"""Adapters between cvdeploy's results and other libraries (each module imports its library only when called)."""
