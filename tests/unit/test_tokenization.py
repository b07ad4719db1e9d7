"""The in-process tokenizer: exact ids with the chunk cache, chat templates like the engines,
clear errors for unusable directories."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from epp.sim.tokenizer import DATA_DIR
from epp.tokenization import TokenizerError, load_tokenizer
from epp.tokenization.tokenizer import PARALLEL_MIN_CHARS, TokenizerSet

PIECES = ["kalo", "mine", "the", "of", "Hello", "world", "naïve", "café", "1234", "x=y;",
          "(a,b)", "it's", "\n", "\n\n", "  ", "\t", ".", "?!", "ünï", "日本語", "<|im_end|>"]  # fmt: skip


def random_text(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        out.append(rng.choice(PIECES))
        out.append(rng.choice([" ", " ", " ", "", "  ", "\n"]))
    return "".join(out)


def test_chunked_encoding_equals_the_whole_text() -> None:
    tok = load_tokenizer(DATA_DIR, chunk_chars=48)
    assert tok.chunking
    rng = random.Random(7)
    # short texts are encoded chunk by chunk on this thread, long ones by the thread pool
    lengths = [rng.randint(0, 400) for _ in range(60)] + [3000, 4000]
    for n in lengths:
        text = random_text(rng, n)
        assert tok.encode(text) == list(tok._tok.encode(text, add_special_tokens=False).ids)
    assert len(random_text(random.Random(1), 3000)) > PARALLEL_MIN_CHARS


def test_partial_ids_are_a_prefix_of_the_full_encoding_at_every_step() -> None:
    tok = load_tokenizer(DATA_DIR, chunk_chars=48)
    rng = random.Random(11)
    for n in (30, 400, 3000):
        head = random_text(rng, n)
        text = head + " and then " + random_text(rng, n)
        for special in (False, True):
            tok.encode_partial(head, special).more(10**9)  # the head is cached now
            full_marks: list[tuple[int, int]] = []
            full = tok.encode(text, special, full_marks)
            tok._cache.entries.clear()
            tok.encode_partial(head, special).more(10**9)
            part = tok.encode_partial(text, special)
            steps = 0
            while True:
                assert part.ids == full[: len(part.ids)]
                assert part.marks == full_marks[: len(part.marks)]
                if part.complete:
                    break
                assert part.rest_estimate() > 0
                part.more(1 + steps)
                steps += 1
            assert part.ids == full and part.rest_estimate() == 0
            tok._cache.entries.clear()


def test_a_peek_gives_the_next_ids_and_leaves_the_chunk_exact() -> None:
    tok = load_tokenizer(DATA_DIR, chunk_chars=512)
    ref = load_tokenizer(DATA_DIR)
    rng = random.Random(13)
    peeks = 0
    for n in (300, 1500, 3000):
        for special in (False, True):
            text = random_text(rng, n)
            full = ref.encode(text, special)
            part = tok.encode_partial(text, special)
            while not part.complete:
                for tokens in (1, 5, 16):
                    got = part.peek(tokens)
                    if got is not None:
                        peeks += 1
                        assert len(got) >= tokens
                        assert got == full[len(part.ids) : len(part.ids) + len(got)]
                assert part.ids == full[: len(part.ids)]
                part.more(1)  # encodes the rest of the peeked chunk
            assert part.ids == full
            assert tok.encode(text, special) == full  # the chunks cached after peeks
    assert peeks > 20


def test_partial_ids_encode_no_fresh_text_until_asked() -> None:
    tok = load_tokenizer(DATA_DIR, chunk_chars=64)
    rng = random.Random(4)
    system = " ".join(rng.choice(["kalo", "mine", "ruta", "vozi"]) for _ in range(2000))
    tok.encode(system)
    fresh = " ".join(rng.choice(["pedu", "sofa", "zi"]) for _ in range(1000))
    before = tok.stats.tokens_encoded
    part = tok.encode_partial(system + " " + fresh)
    assert tok.stats.tokens_encoded == before and not part.complete
    assert len(part.ids) > 1900  # the cached head, free
    full = len(tok._tok.encode(system + " " + fresh).ids)
    assert abs(len(part.ids) + part.rest_estimate() - full) < full * 0.1


def test_a_shared_prefix_is_served_from_the_cache() -> None:
    tok = load_tokenizer(DATA_DIR, chunk_chars=64)
    rng = random.Random(3)
    system = " ".join(rng.choice(["kalo", "mine", "ruta", "vozi"]) for _ in range(2000))
    first = tok.encode(system + " first question")
    hits = tok.stats.chunk_hits
    second = tok.encode(system + " another question entirely")
    assert tok.stats.chunk_hits - hits > 100  # nearly every chunk of the system prompt
    assert first[:1990] == second[:1990]
    assert second == list(tok._tok.encode(system + " another question entirely").ids)


def test_a_shared_system_message_is_not_tokenized_again() -> None:
    tok = load_tokenizer(DATA_DIR)
    rng = random.Random(5)
    system = " ".join(rng.choice(["kalo", "mine", "ruta", "vozi"]) for _ in range(3000))

    def ask(question: str) -> list[int]:
        body = {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": question}]}  # fmt: skip
        ids = tok.request_ids("chat", body)
        assert ids is not None
        text = tok.render_chat(body["messages"], add_generation_prompt=True)
        assert ids == list(tok._tok.encode(text, add_special_tokens=False).ids)
        return ids

    ask("the first question")
    before = tok.stats.tokens_encoded
    question = " ".join(rng.choice(["pedu", "sofa", "zi"]) for _ in range(50))
    ask(question)
    # the chunk that ends the system message is cached too: only the user turn is new
    assert tok.stats.tokens_encoded - before < 80


def test_chat_requests_render_the_template_like_the_engine() -> None:
    tok = load_tokenizer(DATA_DIR)
    msgs = [{"role": "system", "content": "kalo mine"}, {"role": "user", "content": "hi"}]
    text = tok.render_chat(msgs)
    assert text == "<|im_start|>system\nkalo mine<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                   "<|im_start|>assistant\n"  # fmt: skip
    ids = tok.request_ids("chat", {"messages": msgs})
    assert ids == tok.encode(text)
    assert tok.token_to_id("<|im_start|>") == ids[0]  # special tokens are single ids
    no_gen = tok.request_ids("chat", {"messages": msgs, "add_generation_prompt": False})
    assert no_gen is not None and ids[: len(no_gen)] == no_gen and len(no_gen) < len(ids)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "text", "text": "b"}]}]}  # fmt: skip
    assert tok.request_ids("chat", parts) == tok.encode(
        tok.render_chat([{"role": "user", "content": "a\nb"}])
    )


def test_completion_prompts_and_token_arrays() -> None:
    tok = load_tokenizer(DATA_DIR)
    assert tok.request_ids("completions", {"prompt": "kalo mine"}) == tok.encode("kalo mine")
    assert tok.request_ids("completions", {"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert tok.request_ids("completions", {"prompt": ["kalo", "mine"]}) == tok.encode("kalo")
    assert tok.request_ids("embeddings", {"input": "x"}) is None
    assert tok.request_ids("chat", {"messages": "not a list"}) is None


def test_a_template_that_refuses_a_conversation_is_no_tokenization(tmp_path: Path) -> None:
    shutil.copy(DATA_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | tojson }}\n{% endfor %}"
    )
    tok = load_tokenizer(tmp_path)
    assert tok.request_ids("chat", {"messages": [{"role": "system", "content": "x"}]}) is None
    ok = tok.request_ids("chat", {"messages": [{"role": "user", "content": "café"}]})
    assert ok == tok.encode('user: "café"\n')  # tojson keeps non-ASCII text


def test_unusable_directories_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be loaded"):
        load_tokenizer(tmp_path)
    shutil.copy(DATA_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(TokenizerError, match="chat template"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="more than one default"):
        TokenizerSet.from_specs([str(DATA_DIR), str(DATA_DIR)])
    both = TokenizerSet.from_specs([f"m1={DATA_DIR}"])
    assert both.get("m1") is not None and both.get("m2") is None


def test_tokenizers_without_a_safe_pre_tokenizer_encode_whole_texts(tmp_path: Path) -> None:
    cfg = json.loads((DATA_DIR / "tokenizer.json").read_text())
    cfg["pre_tokenizer"] = None  # BPE over the raw text: tokens may cross word boundaries
    (tmp_path / "tokenizer.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path, chunk_chars=16)
    assert not tok.chunking
    text = "kalo mine ruta " * 50
    assert tok.encode(text) == list(tok._tok.encode(text).ids)
