"""A preload module that fails at import."""

raise RuntimeError("boom at import time")
