"""The command line's output: its two consoles, and a model's text printed exactly as written.

`console` prints results on stdout and `err_console` the one-line errors on stderr
(soft-wrapped, so an error stays one line however narrow the terminal); every command module
prints through these two. rich looks up `sys.stdout`/`sys.stderr` at each print, so captured
or redirected streams are followed.

Model text is printed whatever the terminal: rich's Console wraps text at its width (80
columns when the output is not a terminal, or $COLUMNS) and reads [brackets] as markup. Model
text gets neither: a wrap inserts newlines that the model never wrote (Chinese, two columns a
character, would break every 40), and a bracket in the text is the model's, not a style.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def print_line(message: str) -> None:
    """A progress or warning line of a long command on stdout, unwrapped: a wrap at the console's
    width would cut the paths it names in two."""
    console.print(message, soft_wrap=True)


def print_model_text(console: Console, *parts: str | tuple[str, str], end: str = "\n") -> None:
    """Print `parts` (plain strings, or (text, style) pairs) unwrapped, without markup or highlighting."""
    console.print(Text.assemble(*parts), end=end, soft_wrap=True, highlight=False)
