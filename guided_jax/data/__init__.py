"""Text to packed blocks to this host's batches, with no jax: text files, the embedded default
corpus and TFDS sources (:mod:`.sources`), tokenizers (:mod:`.tokenizer`), packing
(:mod:`.packing`), the tokenize-once cache (:mod:`.token_cache`), the grain input pipeline
(:mod:`.pipeline`), and fine-tuning tasks' tables (:mod:`.tables`)."""
