"""resisod: the resiso daemon. Importing this package loads no model library."""
__version__ = "0.1.0"
