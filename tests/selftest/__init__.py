"""The mutation self-test: the catalogue of converter and checkpoint bugs (catalogue.py) and the tests that
prove each is caught and named (test_mutations.py)."""
