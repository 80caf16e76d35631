"""The package version, in a module of its own: modules that write it (PNG metadata, manifests,
converted files) import it from here, not from the package, whose ``__init__`` imports the library
(importing the package from inside it would make an import circle)."""
__version__ = "0.2.0"
