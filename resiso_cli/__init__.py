"""resiso: the command-line client of resisod. Importing it loads no model library."""
from resisod import __version__

__all__ = ["__version__"]
