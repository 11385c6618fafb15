"""The conversions as library functions over formats/, and tokenizer export."""
