"""The router's prompt tokenizer gives exactly the ids transformers gives (which vLLM
uses): chat templates rendered alike, special tokens split alike, the piece cache
invisible; requests it cannot reproduce are refused (None), never guessed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepinfer_router.shared.prompt_tokenizer import (
    PromptTokenizer,
    TokenizerUnavailable,
    probe_conversation,
    probe_text,
)
from tests.e2e.tiny_model import build_tokenizer

transformers = pytest.importorskip("transformers")
SHARED_FIXTURES = [HealthCheck.function_scoped_fixture]  # module-scoped: safe to share


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def reference(tokenizer_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def mine(tokenizer_dir: Path) -> PromptTokenizer:
    return PromptTokenizer.from_dir(tokenizer_dir)


def chat_reference(reference: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_probes_match_transformers(mine: PromptTokenizer, reference: Any) -> None:
    conv = probe_conversation()
    assert mine.chat_ids({"messages": conv}) == chat_reference(reference, conv)
    assert mine.text_ids(probe_text()) == reference(probe_text())["input_ids"]


_text = st.lists(
    st.sampled_from([*"abc xyz\n\t.,!?'-_0123456789éß東京🙂<|>", "<|end|>", "<s>", "  "]),
    max_size=120).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=SHARED_FIXTURES)
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), _text),
                min_size=1, max_size=5))
def test_any_conversation_matches_transformers(
        mine: PromptTokenizer, reference: Any, turns: list[tuple[str, str]]) -> None:
    messages = [{"role": r, "content": c} for r, c in turns]
    assert mine.chat_ids({"messages": messages}) == chat_reference(reference, messages)


@settings(max_examples=60, deadline=None, suppress_health_check=SHARED_FIXTURES)
@given(_text.filter(bool))
def test_any_text_matches_transformers(mine: PromptTokenizer, reference: Any, text: str) -> None:
    assert mine.text_ids(text) == reference(text)["input_ids"]


@settings(max_examples=60, deadline=None, suppress_health_check=SHARED_FIXTURES)
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]),
                          _text.map(lambda t: t * 20)), min_size=1, max_size=4),
       st.integers(1, 300))
def test_a_prompts_head_is_exactly_the_start_of_its_ids(
        mine: PromptTokenizer, reference: Any, turns: list[tuple[str, str]], want: int
) -> None:
    """encode_head gives the first ids of the whole prompt, at least `want` of them (or
    all), and says how many rendered characters they cover."""
    messages = [{"role": r, "content": c} for r, c in turns]
    full = chat_reference(reference, messages)
    rendered = mine.render({"messages": messages})
    assert rendered is not None
    got = mine.encode_head(rendered, want)
    if got is None:  # a long new piece with no space to cut at near the head
        return
    head, covered = got
    assert head.tolist() == full[:len(head)]
    if covered < 0:
        assert len(head) == len(full)
    else:
        # about `want`: cut at 4 characters a token, so fewer where tokens are longer
        assert len(head) >= min(want, len(full)) // 3 and 0 < covered < rendered.chars


def test_a_head_is_cut_short_of_a_long_new_piece(mine: PromptTokenizer) -> None:
    text = "word " * 5000
    rendered = mine.render({"messages": [{"role": "system", "content": text}]})
    assert rendered is not None
    got = mine.encode_head(rendered, 100)
    assert got is not None
    head, covered = got
    assert 60 <= len(head) <= 200 and covered < 1000  # " word" is one token of 5 chars
    # no space to cut at (CJK, minified JSON): no cheap head, the caller encodes it all
    # (off the event loop when long) instead of this encoding it all inline
    cjk = mine.render({"messages": [{"role": "user", "content": "東京の天気" * 4000}]})
    assert cjk is not None and mine.encode_head(cjk, 100) is None


def test_repeated_pieces_come_from_the_cache_and_give_the_same_ids(
        tokenizer_dir: Path, reference: Any) -> None:
    tok = PromptTokenizer.from_dir(tokenizer_dir)
    system = {"role": "system", "content": "You are a helpful assistant. " * 200}
    first = [system, {"role": "user", "content": "question one " * 10}]
    a = tok.chat_ids({"messages": first})
    pieces, chars = tok.cache_size()
    assert pieces >= 1 and chars >= len(system["content"])
    second = [*first, {"role": "assistant", "content": "answer"},
              {"role": "user", "content": "question two " * 10}]
    b = tok.chat_ids({"messages": second})
    assert b == chat_reference(reference, second)
    assert b[: len(a) - 1] == a[: len(a) - 1]  # the next turn extends the previous prompt


def test_a_render_says_how_much_is_left_to_encode(tokenizer_dir: Path, reference: Any
                                                  ) -> None:
    """The router keeps a prompt on the event loop when little of it is new: render()
    counts the characters not in the piece cache; the ids are the same either way."""
    tok = PromptTokenizer.from_dir(tokenizer_dir)
    system = {"role": "system", "content": "You are a helpful assistant. " * 200}
    first = [system, {"role": "user", "content": "question one " * 10}]
    cold = tok.render({"messages": first})
    assert cold is not None and cold.uncached_chars >= len(system["content"])
    assert tok.encode_rendered(cold).tolist() == chat_reference(reference, first)
    second = [*first, {"role": "assistant", "content": "answer " * 20},
              {"role": "user", "content": "question two " * 10}]
    warm = tok.render({"messages": second})
    assert warm is not None
    # only the two new messages (and the role tokens' short glue) are left
    assert warm.uncached_chars < len("answer " * 20) + len("question two " * 10) + 40
    assert tok.encode_rendered(warm).tolist() == chat_reference(reference, second)
    text = tok.render({"prompt": "plain text " * 30})
    assert text is not None
    assert tok.encode_rendered(text).tolist() == reference("plain text " * 30)["input_ids"]


def test_a_tokenizer_that_marks_only_the_first_piece_is_encoded_whole() -> None:
    """SentencePiece-style Metaspace with prepend_scheme="first" puts "▁" before the
    text's first word only: piecewise encoding at special tokens would put one before
    every piece, so the tokenizer must encode such text whole, and match exactly."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                  show_progress=False)
    tok.train_from_iterator(["hello world", "the user said hello", "x y z"] * 50, trainer)
    tok.add_special_tokens([AddedToken("<|user|>", special=True)])
    mine = PromptTokenizer(tok, None, {})
    text = "hello<|user|>hello world<|user|> the user"
    assert mine.encode(text) == tok.encode(text, add_special_tokens=False).ids
    assert mine._split is None


def test_the_piece_cache_is_bounded(tokenizer_dir: Path) -> None:
    base = PromptTokenizer.from_dir(tokenizer_dir)
    tok = PromptTokenizer(base._tok, None, {}, cache_entries=3, cache_chars=10_000)
    for i in range(10):
        tok.text_ids(f"document {i} " + "lorem ipsum dolor " * 20)
    pieces, chars = tok.cache_size()
    assert pieces <= 3 and chars <= 10_000


def test_requests_it_cannot_reproduce_are_refused(mine: PromptTokenizer) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert mine.prompt_ids({"messages": msgs}) is not None
    for extra in ({"tools": [{"type": "function"}]}, {"chat_template": "x"},
                  {"chat_template_kwargs": {"a": 1}}, {"continue_final_message": True},
                  {"add_generation_prompt": "yes"}):
        assert mine.prompt_ids({"messages": msgs, **extra}) is None, extra
    for messages in ([], [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                     [{"role": "user", "content": "hi", "tool_calls": []}],
                     [{"role": 1, "content": "hi"}], "hi", [None]):
        assert mine.prompt_ids({"messages": messages}) is None, messages
    assert mine.prompt_ids({"prompt": [1, 2, 3]}) is None  # ids already
    assert mine.prompt_ids({"prompt": "x", "add_special_tokens": False}) is None
    assert mine.prompt_ids({}) is None


def test_a_template_that_raises_refuses_instead_of_failing(tokenizer_dir: Path) -> None:
    base = PromptTokenizer.from_dir(tokenizer_dir)
    tok = PromptTokenizer(base._tok, "{{ raise_exception('no system role') }}", {})
    assert tok.chat_ids({"messages": [{"role": "system", "content": "x"}]}) is None


def test_unusable_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenizerUnavailable):
        PromptTokenizer.from_dir(tmp_path)  # nothing there
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerUnavailable):
        PromptTokenizer.from_dir(tmp_path)


def test_files_that_are_not_regular_are_refused_without_reading(tmp_path: Path,
                                                                tokenizer_dir: Path) -> None:
    """A FIFO with no writer (reading would wait forever) and a device (/dev/zero never
    ends) in place of tokenizer.json are refused at once; a symlink to a real file (the
    Hugging Face cache's layout) is read."""
    import os

    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "tokenizer.json")
    with pytest.raises(TokenizerUnavailable, match="not a regular file"):
        PromptTokenizer.from_dir(fifo_dir)
    zero_dir = tmp_path / "zero"
    zero_dir.mkdir()
    (zero_dir / "tokenizer.json").symlink_to("/dev/zero")
    with pytest.raises(TokenizerUnavailable, match="not a regular file"):
        PromptTokenizer.from_dir(zero_dir)
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in os.listdir(tokenizer_dir):
        (linked / name).symlink_to(tokenizer_dir / name)
    assert PromptTokenizer.from_dir(linked).has_chat_template


def test_truncation_and_padding_in_tokenizer_json_are_ignored_as_transformers_does(
        tokenizer_dir: Path, tmp_path: Path, reference: Any) -> None:
    """transformers turns a tokenizer.json's own truncation and padding off on every call
    (so vLLM's ids never have them): the router's ids must not have them either."""
    import json
    import shutil

    shutil.copytree(tokenizer_dir, tmp_path / "tok")
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 5, "strategy": "LongestFirst",
                          "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<pad>", "pad_to_multiple_of": None}
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    tok = PromptTokenizer.from_dir(tmp_path / "tok")
    text = "a text of more than five tokens, for sure, many more than five"
    assert tok.text_ids(text) == reference(text)["input_ids"]
    conv = probe_conversation()
    assert tok.chat_ids({"messages": conv}) == chat_reference(reference, conv)
