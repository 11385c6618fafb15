"""The model description: ``ModelConfig`` (config.py) and the families (families.py)."""
