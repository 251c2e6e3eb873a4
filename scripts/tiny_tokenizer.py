"""Train and save a small byte-level BPE tokenizer for offline test checkpoints; lengthen probe prompts.

Used when a model's real tokenizer is not available (no Hub here): the
tokenizer is trained on a fixed built-in English corpus, so the same call
always gives the same vocabulary. The same corpus lengthens a replica's
probe prompt past its sliding window (:func:`probe_text`). Imports only
``tokenizers`` and ``transformers``' tokenizer class (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

# A fixed corpus: enough distinct words for a few hundred merges.
CORPUS = """
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
A tiny model is a small copy of a large one, with the same shape of computation and random weights.
Once upon a time there was a little robot who wanted to learn how to read and write and count.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.
Machine learning models turn numbers into other numbers; attention mixes information across tokens.
Hello world! How are you today? I am fine, thank you. What is the weather like in London?
One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen.
def add(a, b): return a + b  # simple python code for the tokenizer to see
Rivers flow to the sea, mountains rise to the sky, and forests cover the hills in green.
""".strip()

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def train_bpe_tokenizer(output_dir: str | Path, vocab_size: int = 512) -> int:
    """Write ``tokenizer.json`` and its config to ``output_dir``; return the real vocab size.

    Token ids: ``<unk>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos), ``<pad>`` 3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(str(output_dir))
    return tokenizer.get_vocab_size()


# Each corpus line adds tokens, so this many passes over it reach any length a replica can hold
# (2048 positions at one token per character of a ~900-character corpus is about 3 passes).
MAX_CORPUS_PASSES = 64


def probe_text(base: str, count_tokens: Callable[[str], int], min_tokens: int) -> str:
    """``base`` followed by corpus sentences (in order, repeating) until it is at least ``min_tokens`` long.

    ``count_tokens`` gives a text's length in the replica tokenizer's tokens. The text is the
    same for the same tokenizer and length, so a manifest's prompt can be rebuilt.
    """
    text = base
    lines = CORPUS.splitlines()
    for step in range(MAX_CORPUS_PASSES * len(lines)):
        if count_tokens(text) >= min_tokens:
            return text
        text = f"{text} {lines[step % len(lines)]}"
    raise ValueError(f"could not reach {min_tokens} tokens with {MAX_CORPUS_PASSES} passes over the corpus")
