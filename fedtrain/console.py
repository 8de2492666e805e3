"""One rich console for every command, on stderr-free stdout."""

from rich.console import Console

console = Console()
