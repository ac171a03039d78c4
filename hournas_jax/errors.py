"""The one base class of every error a user can fix (config, data, workdir, targets).

main.py reports any `UserError` as one `error: ...` line and exits with its `exit_code`,
without a traceback; anything else is a bug and keeps its traceback. Each module raises its own
subclass (`spaces.SpaceError`, `data.DataError`, `checkpoint.CheckpointError`, ...), so a caller
can still tell a data problem from a checkpoint problem.
"""


class UserError(Exception):
  """A problem with the input (config, dataset, workdir, checkpoints, targets)."""
  exit_code = 1
