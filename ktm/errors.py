"""User-facing errors: one line that names the problem and the fix.

Anything a user can cause (bad config, data, checkpoint, prompt, missing hub) raises `KTMError`;
the CLI prints `ktm: error: <message>` and exits with code 2 instead of a traceback.
"""


class KTMError(Exception):
    """A problem the user can fix. The message says what is wrong and what to do."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} -> {fix}" if fix else problem)


class DiskFullError(KTMError):
    """The disk filled up while writing; the previous version of the file or folder is intact."""
