"""The model: a Flax BERT encoder, Hugging Face checkpoints and tokenizer, adapters
(PALs, low-rank), the task heads and the multi-task model built from a config."""
