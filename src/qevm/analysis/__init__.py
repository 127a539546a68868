"""Answers about a decoded stream: the dump document, ``info``, the analyze-migration.py view."""
