"""ICC profile facts both backends need, read from the profile header (pure Python).

An embedded profile is kept on the output only when it describes the output's pixels: a CMYK
profile left on sRGB pixels is wrong for every viewer, and libvips' jpegsave_buffer died with
SIGSEGV writing exactly that (issue 15).
"""
from __future__ import annotations

# Bytes 16..19 of an ICC header: the colour space of the data the profile describes.
_SPACE_BANDS = {b"GRAY": (1, 2), b"RGB ": (3, 4), b"CMYK": (4,)}


def colour_space(profile: bytes | None) -> str | None:
    """'GRAY', 'RGB', 'CMYK'... or None when there is no readable header."""
    if not profile or len(profile) < 128:
        return None
    return profile[16:20].decode("ascii", "replace").strip() or None


def fits(profile: bytes | None, bands: int) -> bool:
    """True when ``profile`` may be embedded in an image of ``bands`` bands (alpha included)."""
    if not profile or len(profile) < 128:
        return False
    return bands in _SPACE_BANDS.get(profile[16:20], ())
