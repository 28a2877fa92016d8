"""bbt's version: a module of its own, so that what needs it does not import the whole package."""

__version__ = "0.1.0"
