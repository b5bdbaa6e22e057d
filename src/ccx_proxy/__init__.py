"""ccx-proxy: a fast, CCX-compatible Anthropic Messages gateway."""

__version__ = "0.1.0"
