"""Exit codes of Tunebot's processes, one meaning per number: the `tunebot` CLI, job processes and training ranks.

Before this module 3 meant "cancelled" to a data-parallel launcher and "cannot succeed as asked" to the worker.
"""

OK = 0
INCOMPLETE = 1  # a crash (a job process or rank: retried while attempts are left); CLI import: some lines skipped
USAGE = 2  # CLI: wrong arguments, or an error the user can fix (the one-line message says how)
USER_ERROR = 3  # a job process or rank that cannot succeed as asked (bad data, settings): not retried
STOPPED = 4  # stopped before the end (SIGTERM, cancelled, its parent gone): resumable, the caller decides
FLAGGED = 5  # CLI export-model: the export was written, but it does not answer like the tuned model
