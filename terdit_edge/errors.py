"""One exception hierarchy for terdit-edge.

Every error the runtime raises on bad input derives from :class:`TerditError`, so an application
can catch one class. Messages say what was expected, what was found and what to do.
"""


class TerditError(Exception):
    """Base class of every terdit-edge error."""


class FormatError(TerditError):
    """A .tdit file is truncated, corrupted, hostile or of an unknown version."""


class ChecksumError(FormatError):
    """A tensor or the metadata of a .tdit file does not match the checksum the converter wrote."""


class ConvertError(TerditError):
    """A checkpoint cannot be converted (not a TerDiT checkpoint, missing keys, bad values)."""


class InputError(TerditError, ValueError):
    """A caller passed an invalid argument (class id out of range, steps < 1, wrong shape...)."""


class BackendError(TerditError):
    """A requested compute backend is unknown or unavailable on this machine."""
