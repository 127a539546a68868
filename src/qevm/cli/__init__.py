"""The ``qevm`` command line: one small module per verb."""
