"""Train a RoBERTa-style byte-level BPE (vocab.json, merges.txt) or a BERT-style WordPiece
(vocab.txt) tokenizer for any language.

    python -m guided_jax.tokenizer --files a.txt b.txt --vocab_size 8000 --out DIR
    python -m guided_jax.tokenizer --kind wordpiece --files a.txt --vocab_size 30000 --out DIR
    python -m guided_jax.tokenizer --default_corpus --vocab_size 8000 --out DIR

Only parses flags; the work happens in :func:`guided_jax.data.tokenizer.train_tokenizer`.
"""

from __future__ import annotations

from absl import flags

from guided_jax import cli
from guided_jax.data.tokenizer import CONFIG_FILE, FILES_OF_KIND, KINDS

_FILES = flags.DEFINE_multi_string(
    "files", None, "UTF-8 text files, one document per line (--files a.txt b.txt)."
)
_DEFAULT_CORPUS = flags.DEFINE_bool(
    "default_corpus", False, "Train on the embedded default corpus (the stdlib's docstrings)."
)
_KIND = flags.DEFINE_enum("kind", "bpe", list(KINDS), "Tokenizer kind.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", None, "Vocabulary size.")
_OUT = flags.DEFINE_string("out", None, "Output directory (created if needed).")
_MIN_FREQUENCY = flags.DEFINE_integer("min_frequency", 2, "Minimum pair count for a merge.")
_LOWERCASE = flags.DEFINE_bool("lowercase", False, "Lowercase and strip accents (WordPiece).")
flags.mark_flags_as_required(["vocab_size", "out"])
flags.register_multi_flags_validator(
    ["files", "default_corpus"],
    lambda values: bool(values["files"]) != bool(values["default_corpus"]),
    "give either --files or --default_corpus",
)


def main(argv: list[str]) -> None:
    from guided_jax.data.default_corpus import default_corpus
    from guided_jax.data.text import read_text_files
    from guided_jax.data.tokenizer import train_tokenizer
    from guided_jax.storage import check_location

    # "--files a.txt b.txt": the files after the first arrive as arguments.
    with cli.command("tokenizer", argv, positional=bool(_FILES.value)):
        check_location(_OUT.value, "--out")  # local or gs://, refused before training
        files = [*(_FILES.value or []), *argv[1:]]
        texts = default_corpus() if _DEFAULT_CORPUS.value else read_text_files(files)
        tokenizer = train_tokenizer(
            texts,
            _VOCAB_SIZE.value,
            _OUT.value,
            _MIN_FREQUENCY.value,
            _KIND.value,
            _LOWERCASE.value,
        )
    written = ", ".join((*FILES_OF_KIND[_KIND.value], CONFIG_FILE))
    print(
        f"wrote {written} to {_OUT.value} ({_KIND.value}, vocab size {tokenizer.vocab_size}, "
        f"trained on {len(texts)} documents)"
    )


if __name__ == "__main__":
    cli.run(main)
