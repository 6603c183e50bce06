"""
Command-line arguments, as every script here parses them: a bad option ends like any other bad input, in one
paragraph and exit code 1 (argparse's own is 2), and numbers are checked where they are parsed. No torch here, so
data/prepare.py can use it too.
"""

import argparse
import difflib
import re


class Parser(argparse.ArgumentParser):

    def __init__(self, *args, **kwargs):
        # a mistyped --num_epoch is refused, not taken as --num_epochs (train.py's configurator refuses it too)
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        # one paragraph: argparse's own error, a near option for a misspelt one, and where the options are listed
        options = [o for action in self._actions for o in action.option_strings]
        unknown = re.findall(r'--?[\w-]+', message.partition('unrecognized arguments:')[2])
        near = [m for flag in unknown for m in difflib.get_close_matches(flag.split('=')[0], options, n=1)]
        hint = f" Did you mean {', '.join(near)}?" if near else ''
        self.exit(1, f'{self.prog}: error: {message}.{hint} The options: python {self.prog} --help\n')


def at_least(minimum):
    """ an argparse type: a whole number no smaller than minimum """
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'{value} is too small: it must be at least {minimum}')
        return value
    return parse
