"""Reference forward passes, each reading a checkpoint in its own layout and conventions."""
