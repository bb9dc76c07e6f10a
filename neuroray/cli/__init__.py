"""Thin `python -m neuroray.<cmd>` entry points: parse, call the library, print."""
