"""
The one exception type that means "the user's input is wrong, and the message says how": every script ends on one
(core/cli.py) with that paragraph on stderr and exit code 1, the traceback only with --debug / debug=True.
"""


class ClearError(ValueError):
    """ a message written for the user: it names the file or value, what was expected and what was found """
