"""The one exception type for problems the user can fix (config, data, paths).

`mae_jax.main` turns a `UserError` into one line on stderr and a non-zero exit,
without a traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem with the user's input: config values, datasets, paths, checkpoints."""
