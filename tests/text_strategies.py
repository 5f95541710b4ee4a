"""Hypothesis strategies for texts a reader sees nothing in, and for texts with one visible character.

The categories are spelled out here, not imported from ``langops.text_checks``, so the tests pin the
documented definition down rather than repeat whatever the code says.
"""

from __future__ import annotations

from hypothesis import strategies as st

INVISIBLE_CATEGORIES = ("Zs", "Zl", "Zp", "Cc", "Cf", "Mn", "Mc", "Me")  # separators, controls, format, marks
BLANK_GLYPHS = "\u115f\u1160\u3164\uffa0\u2800"  # Hangul fillers and the blank Braille pattern: drawn as nothing

invisible_characters = st.characters(categories=INVISIBLE_CATEGORIES) | st.sampled_from(BLANK_GLYPHS)
blank_texts = st.text(invisible_characters, max_size=24)
visible_characters = st.characters(categories=("L", "N", "P", "S"), exclude_characters=BLANK_GLYPHS)
texts_with_one_visible_character = st.tuples(blank_texts, visible_characters, blank_texts).map("".join)
