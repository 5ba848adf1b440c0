"""Text: tokenizers (HF tokenizer.json or a GGUF vocabulary), incremental detokenization for
streaming, and chat templates."""
