"""Section markers in text that is still being written.

An answer's sections are separated by a marker (the teacher's is "\\nRecomendación:"). While the
model writes it, the text ends with only its start: the engine must not end the section there, and
the stream must not show it to the student yet. Both ask the same question of the text.
"""

from __future__ import annotations


def marker_overlap(text: str, marker: str) -> int:
    """How many trailing characters of text are the start of marker (never all of it: a whole
    marker has been written); 0 when none are, or when there is no marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
