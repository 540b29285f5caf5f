"""Output size and decode-time shrink for a frame: pure arithmetic shared by both backends."""
from __future__ import annotations

from dataclasses import dataclass

from resize.probe import Probe


@dataclass(frozen=True)
class Plan:
    width: int  # output, as displayed (orientation applied)
    height: int
    stored_width: int  # output before the orientation is applied
    stored_height: int
    shrink: int  # JPEG DCT-domain reduction on decode: 1, 2, 4 or 8


def fit_box(width: int, height: int, box_w: int, box_h: int) -> tuple[int, int]:
    """Largest size inside the box with the aspect ratio kept (rounded, at least 1 px).

    A 16:9 input into a 16:9 box lands exactly on the box.
    """
    scale = min(box_w / width, box_h / height)
    return max(1, min(box_w, round(width * scale))), max(1, min(box_h, round(height * scale)))


def fits_already(p: Probe, box_w: int, box_h: int) -> bool:
    w, h = p.display_size
    return w <= box_w and h <= box_h


def plan(p: Probe, box_w: int, box_h: int) -> Plan:
    w, h = p.display_size
    out_w, out_h = fit_box(w, h, box_w, box_h)
    sw, sh = (out_h, out_w) if p.transposed else (out_w, out_h)
    shrink = 1
    if p.format == "jpeg":
        # Same rule as Pillow's draft(): the largest of 8/4/2 that keeps the decoded image at
        # least as big as the output, so the final resample only ever reduces.
        limit = min(p.width // sw, p.height // sh)
        shrink = next((s for s in (8, 4, 2) if s <= limit), 1)
    return Plan(out_w, out_h, sw, sh, shrink)
