"""The one error type of the pipeline: a message a person can act on."""


class HookError(Exception):
    """A failure with a one-line message that names the thing and the fix.

    Raised once where the problem is found and reported once (by doit's reporter or a CLI's
    main), never wrapped into a traceback for the user.
    """
