"""What counts as "no text": the one definition the server, validate and prepare share.

A text is blank when a reader would see nothing in it. Every character of a blank text is one of:

* whitespace and separators: Unicode categories Zs, Zl, Zp (space, no-break space, ideographic space,
  line and paragraph separators), and the whitespace control characters (tab, newline);
* control characters, category Cc: NUL and the rest of C0, DEL, C1;
* format characters, category Cf: zero-width space and joiners, word joiner, byte-order mark, soft
  hyphen, bidirectional marks, invisible operators, tag characters;
* combining marks, categories Mn, Mc and Me: accents, vowel signs and enclosing marks with no letter to
  sit on, variation selectors (U+FE00..U+FE0F, U+E0100..U+E01EF), the combining grapheme joiner;
* the letters and symbols drawn as nothing (``BLANK_GLYPHS``): U+115F HANGUL CHOSEONG FILLER, U+1160
  HANGUL JUNGSEONG FILLER, U+3164 HANGUL FILLER, U+FFA0 HALFWIDTH HANGUL FILLER and U+2800 BRAILLE
  PATTERN BLANK.

Anything else is visible, private-use and unassigned code points included (a reader sees a glyph or a
box). A lone surrogate (category Cs) is not blank either: it is not valid Unicode, which the server
refuses as such. The empty string is blank.
"""

from __future__ import annotations

import unicodedata

INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Mn", "Mc", "Me"})
BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
BLANK_DESCRIPTION = ("no visible character: only whitespace, control, format or combining characters, variation "
                     "selectors, or blank fillers such as U+3164 and U+2800")


def is_blank(text: str) -> bool:
    """True when nothing in ``text`` is visible (the module docstring lists what is invisible)."""
    return all(char in BLANK_GLYPHS or unicodedata.category(char) in INVISIBLE_CATEGORIES for char in text)
