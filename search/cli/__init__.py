"""The command-line programs (scripts/NAME.py launches search.cli.NAME) and what they share."""
