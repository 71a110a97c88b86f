"""Training data at scale: `megamesh data prepare` writes a corpus as checksummed shards of
token ids (`data.shards`, `data.prepare`); training streams them from a folder or any
fsspec URL, each process reading only the rows of its own batch shard, and mixes sources
by weight (`data.batches`); `data.tokenizer` finds the tokenizer a model came with."""
