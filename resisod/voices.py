"""Which language a voice name or a text is in: what routes a TTS request to a domain.

Pure functions over strings, shared by the daemon (routing) and the speech engines
(sentence splitting). A request names a voice the way its author knows it: a locale
(`zh-CN`, `zh_CN`), a language (`zh`, `cmn`, `mandarin`), a Piper voice file name
(`zh_CN-huayan-medium`), or nothing at all, in which case the text's script decides.
"""
from __future__ import annotations

import re

# Language codes and the other names people use for them. Keys are what domains are
# tagged with; every name is compared after `norm`.
LANGUAGE_NAMES: dict[str, tuple[str, ...]] = {
    "zh": ("zh", "zh-cn", "cmn", "zh-cmn", "zh-hans", "zh-sg", "mandarin", "chinese"),
    "yue": ("yue", "zh-yue", "zh-hk", "cantonese"),
    "en": ("en", "en-us", "en-gb", "english"),
    "ja": ("ja", "ja-jp", "japanese"),
    "ko": ("ko", "ko-kr", "korean"),
}
_BY_NAME = {name: lang for lang, names in LANGUAGE_NAMES.items() for name in names}

# Unicode blocks that identify a script without a dictionary
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff]")
_HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")
_LATIN = re.compile(r"[A-Za-z]")


def norm(name: str) -> str:
    """`zh_CN`, `zh-cn` and `ZH-CN` are one name."""
    return name.strip().lower().replace("_", "-")


def language_of_name(name: str) -> str | None:
    """The language a voice or locale name denotes: `zh-CN` and `cmn` are zh, a Piper file
    `en_US-joe-medium` is en; None when the name says nothing recognisable."""
    n = norm(name)
    if not n:
        return None
    if n in _BY_NAME:
        return _BY_NAME[n]
    head = n.split("-")[0]  # `zh-cn-huayan-medium` -> zh, `en-us-joe-medium` -> en
    if head in _BY_NAME:
        return _BY_NAME[head]
    if "-".join(n.split("-")[:2]) in _BY_NAME:
        return _BY_NAME["-".join(n.split("-")[:2])]
    return None


def names_of(language: str) -> tuple[str, ...]:
    return LANGUAGE_NAMES.get(language, (language,))


def detect_language(text: str) -> str | None:
    """The language a text's script points to. Kana means Japanese (which also uses Han),
    Hangul Korean, Han alone Chinese; Latin letters alone English, the default voice's
    language in practice. None for text with no letters (digits, punctuation)."""
    if _KANA.search(text):
        return "ja"
    if _HANGUL.search(text):
        return "ko"
    if _HAN.search(text):
        return "zh"
    if _LATIN.search(text):
        return "en"
    return None


# A sentence ends at Western punctuation followed by a space, at CJK full-width
# punctuation (which is not followed by one), or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|(?<=[。！？；…])\s*|\n+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
