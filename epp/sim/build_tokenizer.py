"""Build the simulator's tokenizer: a small byte-level BPE trained on a generated corpus.

    python -m epp.sim.build_tokenizer [OUT_DIR]      # default: epp/sim/data/tokenizer

The result is shipped in the repository (epp/sim/data/tokenizer/, ~100 KB) rather than built
at first use: the simulator and the EPP must load byte-identical files, and a file in git
cannot drift with the `tokenizers` version or the machine, while a trainer's output might.
This script documents how it was made and rebuilds it when the corpus below changes.

The corpus is generated from a fixed seed and makes sure that
- every pseudo-word of the benchmark workloads (two syllables, `kalo`, `mine`, ...) is one
  token with and without a leading space, so a scenario's "2000-token system prompt" is
  2000 tokens under this tokenizer too;
- every reply word of the simulator (`epp.sim.tokenizer.OUTPUT_WORDS`, " the", " of", ...)
  is one token, so a reply sent back in the next turn re-tokenizes to the ids generated;
- common English words and punctuation tokenize reasonably (~4 characters per token).
The chat template is ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`), special tokens
`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DATA_DIR = Path(__file__).parent / "data" / "tokenizer"
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "so", "du", "fa")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_ENGLISH_TEXT = (
    "the of and to in is it that for on was with he as you do at by this had not are but "
    "from or have an they one were her all she can use each how said time will up if out "
    "many then them so some make like him into has look two more go see way who its now "
    "find long down day did get come made may part what when which there their would about "
    "could other than first been call water people word number over new sound take only "
    "little work know place year live me back give most very after thing our just name good "
    "sentence man think say great where help through much before line right too mean old any "
    "same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land "
    "different home us move try kind hand picture again change off play spell air away animal "
    "house point page letter mother answer found study still learn should world high every "
    "near add food between own below country plant last school father keep tree never start "
    "city earth eye light thought head under story saw left few while along might close "
    "something seem next hard open example begin life always those both paper together got "
    "group often run important until children side feet car mile night walk white sea began "
    "grow took river four carry state once book hear stop without second later miss idea "
    "enough eat face watch far really almost let above girl sometimes mountain cut young talk "
    "soon list song being leave family question answer system user assistant model request "
    "server token cache prefix data value result error true false none return class def "
    "import print self string list dict int float"
)
ENGLISH = tuple(_ENGLISH_TEXT.split(" "))


def reply_words() -> list[str]:
    from epp.sim.tokenizer import OUTPUT_WORDS

    return [w.strip() for w in OUTPUT_WORDS]


def corpus(seed: int = 20_240_601) -> Iterator[str]:
    rng = random.Random(seed)
    pseudo = [a + b for a in SYLLABLES for b in SYLLABLES]
    replies = reply_words()
    for _ in range(3000):
        yield " ".join(rng.choice(pseudo) for _ in range(40))
        yield rng.choice(pseudo) + " " + " ".join(rng.choice(pseudo) for _ in range(5))
        yield "user" + str(rng.randrange(100)) + ": " + " ".join(rng.choice(pseudo) for _ in range(8))
        yield "\n" + " ".join(rng.choice(replies) for _ in range(30))
        words = [rng.choice(ENGLISH) for _ in range(rng.randint(6, 18))]
        words[0] = words[0].capitalize()
        yield " ".join(words) + rng.choice((".", "?", "!", ",", ";", ":")) + "\n"
        yield f"{rng.randrange(10_000)} {rng.randrange(100)}.{rng.randrange(100)} ({rng.choice(ENGLISH)})"


def build(out: Path = DATA_DIR, vocab_size: int = 2048) -> dict[str, object]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    pseudo = [a + b for a in SYLLABLES for b in SYLLABLES]
    not_single = [
        w for w in [*pseudo, *(" " + p for p in pseudo), *(" " + r for r in reply_words())]
        if len(tok.encode(w, add_special_tokens=False).ids) != 1
    ]
    return {"vocab_size": tok.get_vocab_size(), "not_single_token": not_single}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=str(DATA_DIR))
    p.add_argument("--vocab-size", type=int, default=2048)
    a = p.parse_args(argv)
    info = build(Path(a.out), a.vocab_size)
    print(json.dumps(info))
    return 0 if not info["not_single_token"] else 1


if __name__ == "__main__":
    sys.exit(main())
