"""The rich consoles every command prints with: results to stdout, warnings to stderr (so that
``X=$(fedtrain ...)`` captures only the result)."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
