"""Training data: rows of a file -> (prompt, answer) examples -> token ids with the loss on the
answer tokens, split into train and eval and cached on disk.

One concept per module, each importing only those above it in this list:
file_records (reading a file's records by format), rows (checking them; prompt and answer),
tokens (token ids and tables), splits (train and eval), summary (what `autotune data inspect`
reports) and token_cache (splits saved once, memory-mapped).
How training steps batch the examples is the training package's (autotune.training.batching).
"""
