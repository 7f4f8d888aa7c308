"""Reading and writing models: loading pipelines, the erased delta and its exports, single-file
layouts, atomic writes, the real CLIP tokenizer, and the built-in tiny pipelines."""
