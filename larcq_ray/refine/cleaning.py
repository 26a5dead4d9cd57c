"""Turn an LLM's answer into the rewritten description alone.

Instruction-tuned models often wrap the answer: a preamble ("Sure! Here is the condensed
description:"), quotes, markdown bold or a bullet, and sometimes a note after a blank line
("This keeps all events..."). `clean_output` removes those, conservatively: it only cuts text that
matches a known wrapper shape, so an answer that is already clean comes back unchanged (modulo
whitespace). What it cannot fix (gibberish, dropped events) is `checks.py`'s job.
"""

from __future__ import annotations

import re

# A short lead-in that ends with a colon, either courteous ("Here is the condensed description:",
# "Sure! Here's a rephrased version:") or made of meta words only ("Rewritten:", "Condensed
# description:", "Final answer:"). Content like "New Year fireworks: ..." is left alone.
_COURTESY = r"here(?:'s| is| are)|sure|certainly|of course|okay|ok|alright|absolutely"
_META_WORDS = (
    r"rewritten|rewrite|rephrased|rephrase|rephrasing|condensed|condense|shortened|shorter|revised|"
    r"refined|new|final|fluent|single|one|the|a|an|my|description|version|sentence|query|answer|"
    r"output|result|response|summary|audio|text|paraphrase|paraphrased|rewording|reworded"
)
_PREAMBLE = re.compile(
    rf"^\s*(?:(?:{_COURTESY})\b[^\n:]{{0,80}}?:|(?:(?:{_META_WORDS})\b[ \t]*){{1,5}}:|"
    rf"(?:sure|certainly|of course|okay|ok|alright|absolutely)\s*[!.,]+)\s*",
    re.IGNORECASE,
)
# "Sure!" / "Certainly." on its own, before the real answer on the next line.
_COURTESY_LINE = re.compile(r"^\s*(?:sure|certainly|of course|okay|ok|alright|absolutely)\b[^\n]{0,60}$",
                            re.IGNORECASE)
# A note on its own line after the answer: "Note: ...", "This version keeps ...", "Explanation: ...".
_NOTE_LINE = re.compile(r"^\s*(?:\(?note\b|explanation\b|this (?:description|version|rewrite|keeps|preserves|"
                        r"condensed|rephrased|sentence)|i (?:kept|have|merged|combined|preserved)\b|"
                        r"(?:all|every) (?:the )?(?:events?|sounds?) (?:are|is|were) (?:kept|preserved))",
                        re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)])\s+")
_QUOTES = [('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("`", "`"),
           ("\u00ab", "\u00bb")]
# Chat special tokens a model may echo when it does not stop at them.
_SPECIAL = re.compile(r"<\|[^|>]{1,40}\|>|</?s>|\[/?INST\]")


def _strip_markdown(text: str) -> str:
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text, flags=re.DOTALL)
    text = re.sub(r"__(.+?)__", r"\1", text, flags=re.DOTALL)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", text)
    text = re.sub(r"^\s*#{1,6}\s+", "", text)
    return text


def _strip_quotes(text: str) -> str:
    changed = True
    while changed and len(text) >= 2:
        changed = False
        for a, b in _QUOTES:
            if text.startswith(a) and text.endswith(b) and len(text) >= 2:
                inner = text[len(a):len(text) - len(b)]
                if a == b and a in inner:  # '"a" and "b"': not one quoted span
                    continue
                text, changed = inner.strip(), True
    return text


def _strip_preamble(text: str) -> str:
    for _ in range(3):  # "Sure! Here is the rewritten description:" = two lead-ins
        lines = text.split("\n")
        if len(lines) > 1 and _COURTESY_LINE.match(lines[0]) and ":" not in lines[0]:
            text = "\n".join(lines[1:]).strip()
            continue
        m = _PREAMBLE.match(text)
        if not m:
            break
        text = text[m.end():].strip()  # a lead-in with nothing after it leaves "" (no answer)
    return text


def clean_output(text: str | None) -> str:
    """The rewritten description alone, on one line; "" if nothing is left."""
    if not text:
        return ""
    # A model that does not stop at its end token runs on into a new turn: keep the first part.
    parts = [p for p in _SPECIAL.split(str(text)) if p.strip()]
    if not parts:
        return ""
    t = parts[0].replace("\r\n", "\n").replace("\r", "\n").strip()
    t = _strip_markdown(t)
    t = _strip_quotes(t)  # '"Here is ...: answer."': the quotes may wrap the lead-in too
    t = _strip_preamble(t)
    # Keep the first paragraph: after a blank line comes a note or an alternative.
    t = re.split(r"\n\s*\n", t, maxsplit=1)[0].strip()
    lines = t.split("\n")
    for i in range(1, len(lines)):
        if _NOTE_LINE.match(lines[i]):
            t = "\n".join(lines[:i]).strip()
            break
    t = _BULLET.sub("", t)
    t = _strip_preamble(t)  # a bullet may hide a lead-in: "- Rewritten: ..."
    t = _strip_quotes(t)
    t = _strip_markdown(t)
    # A trailing note in parentheses: "(All events are kept.)"
    t = re.sub(r"\s*\((?:note|this|all|i |the events|every)[^()]*\)[.!]?\s*$", "", t, flags=re.IGNORECASE)
    t = " ".join(t.split())
    t = _strip_quotes(t)
    return t.strip()
