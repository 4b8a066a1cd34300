"""Edit tokens from the difference of two prompts (LUSD App. 6.1), with our own rules (no tagger download).

LUSD strips the longest common word prefix and suffix of the source and target prompts, keeps the
nouns of what remains of the target (NLTK POS tags NN/NNS), and, when the differing part does not end
in a noun, extends it with the following target words until one is included. We replace the POS
tagger (its model is a run-time data download) by closed word lists: articles, prepositions, pronouns,
conjunctions, auxiliaries, common adjectives (colours, sizes, materials) and verb forms (-ing/-ed, a
list of frequent verbs) are "not a noun"; every other word is taken as a noun. This is right for the
short captions editing uses ("a cat wearing a hat", "a cup of matcha"); users can always name the
tokens (`edit_tokens`).
"""
from __future__ import annotations

import re
from typing import Sequence

ARTICLES = {"a", "an", "the", "some", "any", "this", "that", "these", "those", "each", "every"}
PREPOSITIONS = {
    "of", "in", "on", "at", "with", "from", "by", "for", "to", "into", "onto", "under", "over", "behind",
    "near", "next", "beside", "between", "above", "below", "inside", "outside", "through", "across",
    "around", "against", "along", "among", "without", "within", "up", "down", "off", "out", "about",
}
OTHER_FUNCTION = {
    "and", "or", "but", "nor", "so", "yet", "as", "than", "is", "are", "was", "were", "be", "been",
    "being", "has", "have", "had", "do", "does", "did", "it", "its", "his", "her", "their", "my", "your",
    "our", "he", "she", "they", "we", "you", "i", "him", "them", "who", "which", "while", "very", "too",
    "also", "not", "no", "there", "here", "front", "top", "side", "left", "right", "middle", "center",
}
ADJECTIVES = {
    "red", "green", "blue", "yellow", "black", "white", "brown", "orange", "pink", "purple", "gray",
    "grey", "golden", "silver", "wooden", "small", "big", "large", "tiny", "huge", "little", "cute",
    "old", "young", "new", "happy", "sad", "angry", "beautiful", "pretty", "dark", "bright", "light",
    "tall", "short", "long", "round", "square", "striped", "shiny", "colorful", "snowy", "sunny",
    "rainy", "cloudy", "wet", "dry", "hot", "cold", "warm", "fluffy", "furry", "metal", "glass",
    "plastic", "stone", "paper", "cartoon", "realistic", "detailed", "cinematic", "watercolor",
}
VERBS = {
    "wearing", "holding", "sitting", "standing", "lying", "running", "jumping", "eating", "sleeping",
    "playing", "looking", "made", "covered", "filled", "painted", "carrying", "riding", "flying",
    "floating", "swimming", "walking", "wears", "holds", "sits", "stands",
}
NOT_NOUN = ARTICLES | PREPOSITIONS | OTHER_FUNCTION | ADJECTIVES | VERBS
_WORD = re.compile(r"[A-Za-z0-9<>_'\-]+")


def words(prompt: str) -> list[str]:
    return _WORD.findall(prompt.lower())


def is_noun(word: str) -> bool:
    """Our stand-in for a POS tagger's NN/NNS (see the module docstring)."""
    w = word.lower()
    if w in NOT_NOUN or w.isdigit():
        return False
    if len(w) > 4 and (w.endswith("ing") or w.endswith("ed")) and w not in {"bed", "shed", "seed", "ceiling", "building", "painting", "ring", "king", "wing", "string"}:
        return False
    return True


def diff_span(src: list[str], tgt: list[str]) -> tuple[int, int]:
    """``[start, end)`` of the words of `tgt` left after removing the longest common prefix and suffix."""
    prefix = 0
    while prefix < min(len(src), len(tgt)) and src[prefix] == tgt[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(src), len(tgt)) - prefix and src[-1 - suffix] == tgt[-1 - suffix]:
        suffix += 1
    return prefix, len(tgt) - suffix


def edit_words(source: str, target: str) -> list[str]:
    """Nouns of the differing part of `target` (LUSD App. 6.1 with `is_noun` as the tagger).

    Returns [] when the prompts do not differ in any noun (e.g. only in an adjective that is not
    followed by a noun); callers then fall back to a uniform mask.
    """
    src, tgt = words(source), words(target)
    prefix, end = diff_span(src, tgt)
    if end <= prefix:
        return []
    # Extend to the right until the differing part holds a noun (e.g. "wearing" -> "wearing a hat").
    while end < len(tgt) and not any(is_noun(w) for w in tgt[prefix:end]):
        end += 1
    return [w for w in tgt[prefix:end] if is_noun(w)]


def token_indices(tokenizer, prompt: str, chosen: Sequence[str], source: str | None = None) -> list[int]:
    """Columns (BOS = 0, padded prompt) of every sub-word token of each word in `chosen`.

    Without `source`: every occurrence of each word (user-named tokens). With `source`: only the occurrences
    in the part of `prompt` that differs from `source`, as LUSD masks the tokens of the differing part: the
    k-th repeat of a word in `chosen` takes its k-th occurrence at or after the first token where the two
    prompts' token ids differ ("a cat next to a mirror" -> "a cat next to a cat": the second "cat" only).
    A word split into several tokens contributes all of them (its meaning is spread over its pieces).
    Raises ValueError naming the word when it does not occur there.
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    start = 0
    if source is not None:
        src = tokenizer(source, truncation=True, max_length=tokenizer.model_max_length).input_ids
        while start < min(len(ids), len(src)) and ids[start] == src[start]:
            start += 1
    columns: list[int] = []
    repeats: dict[str, int] = {}
    for word in chosen:
        piece = tokenizer(word.strip(), add_special_tokens=False).input_ids
        found = [s for s in range(start, len(ids) - len(piece) + 1) if piece and ids[s : s + len(piece)] == piece]
        if source is not None:
            k = repeats.get(word, 0)
            repeats[word] = k + 1
            found = found[k : k + 1]
        if not found:
            where = f"the part of the target prompt {prompt!r} that differs from {source!r}" if source is not None else f"the target prompt {prompt!r}"
            raise ValueError(f"edit token {word!r} does not occur in {where}")
        for first in found:
            columns.extend(range(first, first + len(piece)))
    return sorted(set(columns))


def subject_words(source: str, target: str) -> str | None:
    """The words of the source prompt that name what a personalized prompt refers to (the subject mask's
    words): the subject noun with the source words the target replaced right before it.

    The noun, in this order: a noun of the differing part that the source's differing part also has
    (``"a cat sitting" -> "a sks cat wearing a hat"``: ``"cat"``); a noun the target replaced
    (``"a photo of a cat" -> "a photo of a <sks>"``: ``"cat"``); the first noun of the source after the
    differing part (``"a photo of a cat" -> "a photo of a sks cat"``: ``"cat"``). Replaced words before it
    describe the same object and are kept (``"a yellow circle" -> "a sks circle"``: ``"yellow circle"``;
    on the toy model only the color word's cross-attention finds the object). Leading articles are
    dropped; None when the prompts name nothing.
    """
    src, tgt = words(source), words(target)
    start, end = diff_span(src, tgt)
    src_end = len(src) - (len(tgt) - end)  # the source side of the differing part is src[start:src_end]
    kept = [i for i in range(start, src_end) if is_noun(src[i]) and src[i] in tgt[start:end]]
    replaced = [i for i in range(start, src_end) if is_noun(src[i])]
    after = [i for i in range(src_end, len(src)) if is_noun(src[i])]
    at = (kept[-1:] or replaced[-1:] or after[:1] or [None])[0]
    if at is None:
        return None
    phrase = src[start:at + 1]
    while phrase and phrase[0] in ARTICLES:
        phrase = phrase[1:]
    return " ".join(phrase)
