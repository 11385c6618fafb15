"""One module per checkpoint format (reader, config, table, writer) and the registry that
detects and opens them."""
