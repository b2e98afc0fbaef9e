"""One model's prompts as token ids, the way vLLM makes them: the chat template rendered
with the model's special tokens, then encoded without special tokens (chat); a text
prompt encoded with them (completions).

The tokenizer is Hugging Face `tokenizers` (Rust; the library vLLM's fast tokenizers are
built on) and the template is rendered by jinja2's immutable sandbox with the same
settings, filters and globals `transformers` uses, so the ids match vLLM's; the router
checks that they do before using them (service.py).

Repeated prompt parts cost almost nothing: the rendered text is cut at the tokenizer's
special tokens (which the tokenizer itself splits out before anything else, so each piece
encodes the same alone as within the whole) and the ids of each long piece are kept in a
bounded LRU: a shared system prompt or a conversation's earlier turns are encoded once.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from array import array
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

MAX_FILE_BYTES = 64 << 20  # tokenizer.json of the largest vocabularies is ~20 MiB
_MIN_CACHED_PIECE = 64  # shorter pieces encode faster than a cache lookup pays back
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Request fields that change what vLLM renders in ways not reproduced here: such
# requests keep the approximate index.
_CHAT_UNSUPPORTED = ("tools", "documents", "chat_template", "chat_template_kwargs",
                     "continue_final_message", "mm_processor_kwargs",
                     "truncate_prompt_tokens")


# Where a head is cut: about the tokens wanted on prose and code (fewer where tokens are
# longer, and the head then covers fewer blocks; a generous 8 doubled the encoding work
# of every new prompt, benchmarks/routing.py --indexes approximate,precise).
_HEAD_CHARS_PER_TOKEN = 4


_CUT = re.compile(r"(?<=\S) ")  # a space after a non-space: where a pre-token starts


def _space_cut(text: str, at: int, within: int) -> int:
    """The first position in [at, at + within) holding a space that follows a non-space
    (one C-speed search); -1: none there."""
    m = _CUT.search(text, at, at + within)
    return m.start() if m else -1


class TokenizerUnavailable(Exception):
    """A model directory without a usable tokenizer or chat template."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _read(path: Path) -> str:
    """A regular file of at most MAX_FILE_BYTES, checked on the open file (a path swapped
    after a check, a FIFO that never ends or /dev/zero are refused, not read forever)."""
    # O_NONBLOCK: opening a FIFO does not wait for a writer (regular files ignore it);
    # symlinks are followed (the Hugging Face cache links snapshots to blobs).
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TokenizerUnavailable(f"{path} is not a regular file")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise TokenizerUnavailable(f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB")
    return data.decode("utf-8")


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # as transformers: jinja's own tojson escapes HTML characters
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it (apply_chat_template)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclass(slots=True)
class RenderedPrompt:
    """A prompt as text cut at special tokens, before encoding: `uncached_chars` says how
    much encoding work is left (pieces not in the LRU), so a caller can keep cheap prompts
    on the event loop and send only real work to a thread."""

    prefix: tuple[int, ...]  # ids before the pieces (a text prompt's BOS)
    pieces: list[str | int]  # text to encode, or a special token's id
    uncached_chars: int
    whole: str | None = None  # encoded in one call, special tokens added (no pieces)
    chars: int = 0  # the rendered prompt's length


class PromptTokenizer:
    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        chat_template: str | None,
        special_tokens: Mapping[str, str],
        *,
        cache_entries: int = 4096,
        cache_chars: int = 32 << 20,
    ) -> None:
        # transformers turns a tokenizer.json's own truncation and padding off on every
        # call, so vLLM's ids never have them: neither do the router's.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self._template = compile_template(chat_template) if chat_template else None
        self._special_vars = dict(special_tokens)
        # Ids as 4-byte arrays: a Python int costs 32+ bytes, and the LRU holds millions.
        self._cache: OrderedDict[str, array[int]] = OrderedDict()
        self._cache_entries = cache_entries
        self._cache_chars = cache_chars
        self._cached_chars = 0
        self._lock = threading.Lock()
        self._specials: dict[str, int] = {}
        splittable = True
        for token_id, added in tokenizer.get_added_tokens_decoder().items():
            if added.special:
                self._specials[added.content] = token_id
                # A token that eats neighbouring spaces, or one normalised first, does not
                # cut the text cleanly: encode whole.
                if added.lstrip or added.rstrip or added.single_word or added.normalized:
                    splittable = False
        self._special_texts = {tid: text for text, tid in self._specials.items()}
        self._split = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(
                self._specials, key=len, reverse=True)) + ")")
            if splittable and self._specials else None
        )
        if self._split is not None and not self._splits_exactly():
            # e.g. a Metaspace pre-tokenizer with prepend_scheme="first" marks only the
            # text's first piece: encoding pieces apart would mark every one.
            self._split = None
        # A prompt's start can be encoded alone where text cut before a space encodes
        # into a prefix of the whole text's ids (BPE merges stay within pre-tokens, and
        # the usual pre-tokenizers start one at a space after a non-space): checked.
        self._heads = self._cuts_exactly()
        # What the post-processor adds to a text prompt: only a fixed prefix (BOS, or
        # nothing) is reproduced piecewise; anything else encodes the whole text.
        bare = self._ids("a")
        full = self._ids("a", special=True)
        n = len(full) - len(bare)
        self._text_prefix: tuple[int, ...] | None = (
            tuple(full[:n]) if n >= 0 and full[n:] == bare else None)

    def _splits_exactly(self) -> bool:
        """Whether encoding the text between special tokens piece by piece gives the ids
        of encoding it whole, on a probe mixing specials with spaces and newlines."""
        glue = ("Hello", " world ", "\n", "  two spaces", "end.\n\n", " ", "x")
        specials = sorted(self._specials)[:16]
        probe = "".join(g + sp for sp in specials for g in glue) + " tail"
        whole = self._ids(probe)
        return self.encode_rendered(self._rendered((), probe)).tolist() == list(whole)

    def _cuts_exactly(self) -> bool:
        """Whether text cut before a space that follows a non-space encodes into a prefix
        of the whole text's ids, on probes of prose, code, numbers and odd spacing."""
        probes = (
            "The quick brown fox, it said: jumps over 1234567 lazy dogs!  Twice   over.\n"
            "def main(argv):\n    return sum(int(x) for x in argv)  # 42\n\ttab  end",
            "Ünïcödé wörds — and “quotes” … and emoji 🙂 then ASCII again, 3.14159 pi.",
        )
        for text in probes:
            whole = self._ids(text)
            for cut in range(1, len(text)):
                if text[cut] == " " and not text[cut - 1].isspace():
                    head = self._ids(text[:cut])
                    if whole[:len(head)] != head:
                        return False
        return True

    def encode_head(self, rendered: RenderedPrompt, min_tokens: int
                    ) -> tuple[array[int], int] | None:
        """The ids of the prompt's start, exactly: about `min_tokens` of them (all, when
        the prompt is shorter; fewer where tokens are longer than 4 characters), and how
        many of the rendered characters they cover (-1: all of them). A long new piece is
        encoded up to a space after 4 characters a token of what is still wanted; cached
        and short pieces are taken whole. None where no head comes cheap (this tokenizer
        cannot cut, or a long new piece has no space to cut at near there): encode the
        whole prompt instead."""
        if rendered.whole is not None or not self._heads:
            return None
        out = array("i", rendered.prefix)
        covered = 0
        for piece in rendered.pieces:
            if len(out) >= min_tokens:
                return out, covered
            if isinstance(piece, int):
                out.append(piece)
                covered += len(self._special_texts.get(piece, ""))
                continue
            want_chars = (min_tokens - len(out)) * _HEAD_CHARS_PER_TOKEN
            ids = self._cached(piece) if len(piece) > 2 * want_chars else self._piece(piece)
            if ids is not None:
                out.extend(ids)
                covered += len(piece)
                continue
            cut = _space_cut(piece, want_chars, want_chars)
            if cut < 0:  # no space near (CJK, minified JSON...): not cheap
                return None
            out.extend(self._ids(piece[:cut]))
            return out, covered + cut
        return out, -1

    @classmethod
    def from_dir(cls, path: str | Path) -> PromptTokenizer:
        """Load from a model directory (blocking: call it off the event loop)."""
        root = Path(path)
        try:
            tok = tokenizers.Tokenizer.from_str(_read(root / "tokenizer.json"))
            config: dict[str, Any] = {}
            if (root / "tokenizer_config.json").is_file():
                config = json.loads(_read(root / "tokenizer_config.json"))
            template = config.get("chat_template")
            if (root / "chat_template.jinja").is_file():
                template = _read(root / "chat_template.jinja")
            if not isinstance(template, str):  # named templates, or none
                template = None
            special = {k: text for k in _SPECIAL_KEYS
                       if (text := _token_text(config.get(k))) is not None}
            return cls(tok, template, special)
        except TokenizerUnavailable:
            raise
        except Exception as exc:  # files from disk: any parse error refuses
            raise TokenizerUnavailable(f"{root}: {exc}") from None

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    # --- prompts ------------------------------------------------------------------------
    def chat_ids(self, body: Mapping[str, Any]) -> list[int] | None:
        """A chat request's prompt ids, or None where this cannot reproduce vLLM's: no
        template, options it does not render, or messages not plain role/content text."""
        text = self.chat_text(body)
        return self.encode(text) if text is not None else None

    def chat_text(self, body: Mapping[str, Any]) -> str | None:
        """A chat request's prompt as the chat template renders it (see chat_ids)."""
        if self._template is None or any(body.get(k) is not None for k in _CHAT_UNSUPPORTED):
            return None
        if body.get("add_special_tokens", False) is not False:  # vLLM would add BOS
            return None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        for m in messages:
            if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
                    or not isinstance(m.get("content"), str)
                    or any(k not in ("role", "content", "name") for k in m)):
                return None
        add_generation_prompt = body.get("add_generation_prompt", True)
        if not isinstance(add_generation_prompt, bool):
            return None
        try:
            text = self._template.render(
                messages=messages, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self._special_vars)
        except Exception:  # a template may raise anything on odd input
            return None
        return text if isinstance(text, str) else None

    def text_ids(self, prompt: str) -> list[int]:
        """A completions prompt's ids (special tokens added, as vLLM does by default)."""
        return self.encode_rendered(self._text_rendered(prompt)).tolist()

    def _text_rendered(self, prompt: str) -> RenderedPrompt:
        if self._text_prefix is None:  # the post-processor adds more than a prefix
            return RenderedPrompt((), [], len(prompt), whole=prompt, chars=len(prompt))
        return self._rendered(self._text_prefix, prompt)

    def prompt_ids(self, body: Mapping[str, Any]) -> list[int] | None:
        """A chat or completions body's prompt ids; None where not reproducible."""
        rendered = self.render(body)
        return self.encode_rendered(rendered).tolist() if rendered is not None else None

    def render(self, body: Mapping[str, Any]) -> RenderedPrompt | None:
        """A chat or completions body cut into pieces to encode (cheap: template, split
        and cache lookups); None where the prompt ids are not reproducible."""
        if "messages" in body:
            text = self.chat_text(body)
            return self._rendered((), text) if text is not None else None
        prompt = body.get("prompt")
        if (isinstance(prompt, str) and prompt and body.get("add_special_tokens", True) is True
                and body.get("truncate_prompt_tokens") is None):
            return self._text_rendered(prompt)
        return None

    def encode_rendered(self, rendered: RenderedPrompt) -> array[int]:
        """The ids of a rendered prompt (a long one: call it off the event loop; the
        encoding releases the GIL, see _ids)."""
        if rendered.whole is not None:
            return array("i", self._ids(rendered.whole, special=True))
        out = array("i", rendered.prefix)
        for piece in rendered.pieces:
            if isinstance(piece, int):
                out.append(piece)
            else:
                out.extend(self._piece(piece))
        return out

    # --- encoding -----------------------------------------------------------------------
    def _ids(self, text: str, *, special: bool = False) -> list[int]:
        """One text's ids. encode_batch_fast computes no offsets (~30% less work than
        encode for the same ids) and releases the GIL while it runs, which encode does
        not: a worker thread encoding a long prompt leaves the event loop free."""
        return self._tok.encode_batch_fast([text], add_special_tokens=special)[0].ids

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        if add_special_tokens:
            return self.text_ids(text)
        return self.encode_rendered(self._rendered((), text)).tolist()

    def _rendered(self, prefix: tuple[int, ...], text: str) -> RenderedPrompt:
        split = self._split
        pieces: list[str | int] = []
        if split is None:
            pieces.append(text)
        else:
            specials = self._specials
            for piece in split.split(text):
                if piece:
                    special = specials.get(piece)
                    pieces.append(piece if special is None else special)
        cache = self._cache
        uncached = sum(len(p) for p in pieces
                       if isinstance(p, str) and (len(p) < _MIN_CACHED_PIECE or p not in cache))
        return RenderedPrompt(prefix, pieces, uncached, chars=len(text))

    def _cached(self, text: str) -> array[int] | None:
        """A piece's ids if the LRU has them (one locked lookup: another thread may be
        evicting), else None."""
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
            return hit

    def uncached_pieces(self, rendered: RenderedPrompt) -> list[str]:
        """The pieces of a rendered prompt that encoding would add to the LRU."""
        if rendered.whole is not None:
            return []
        cache, longest = self._cache, self._cache_chars // 4
        return [p for p in rendered.pieces if isinstance(p, str)
                and _MIN_CACHED_PIECE <= len(p) <= longest and p not in cache]

    def warm(self, pieces: list[str]) -> None:
        """Encode pieces into the LRU (blocking: call it off the event loop)."""
        for piece in pieces:
            self._piece(piece)

    def _piece(self, text: str) -> array[int]:
        """The ids of text between special tokens (callers only read the array)."""
        if len(text) < _MIN_CACHED_PIECE:
            return array("i", self._ids(text))
        cache = self._cache
        with self._lock:  # long prompts are tokenized in worker threads
            hit = cache.get(text)
            if hit is not None:
                cache.move_to_end(text)
                return hit
        ids = array("i", self._ids(text))
        if len(text) <= self._cache_chars // 4:  # one piece never fills the cache
            # (uncached_pieces skips longer ones alike)
            with self._lock:
                if text not in cache:
                    cache[text] = ids
                    self._cached_chars += len(text)
                while cache and (len(cache) > self._cache_entries
                                 or self._cached_chars > self._cache_chars):
                    old, _ = cache.popitem(last=False)
                    self._cached_chars -= len(old)
        return ids

    def cache_size(self) -> tuple[int, int]:
        """(pieces, characters) held by the LRU."""
        return len(self._cache), self._cached_chars


def probe_conversation() -> list[dict[str, str]]:
    """The conversation the router renders and asks an engine to tokenize, to check that
    both agree: several roles and turns, spaces, newlines, digits and non-ASCII text."""
    return [
        {"role": "system", "content": "You are a careful assistant. Answer in two lines."},
        {"role": "user", "content": "Hello! What is 12 + 30?\nAlso: café, naïve, 東京."},
        {"role": "assistant", "content": "42.  And those words are fine."},
        {"role": "user", "content": "  Thanks —  one more:  tabs\tand spaces. "},
    ]


def probe_text() -> str:
    return "The quick brown fox, 12 lazy dogs\nand a café in 東京.  End."
