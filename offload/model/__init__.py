"""Llama-family decoder, its configuration, weight loaders and tokenizer."""
