"""Reading and writing: loading pipelines, atomic writes and resumable outputs, digests, the real CLIP tokenizer,
the single-file key layouts, and the built-in tiny pipelines. What an erasure becomes is `concept_erase.export`."""
