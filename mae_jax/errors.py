"""The one exception type for problems the user can fix (config, data, paths).

`mae_jax.main` turns a `UserError` into one line on stderr and a non-zero exit,
without a traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem with the user's input: config values, datasets, paths, checkpoints."""


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (TensorFlow's `.message` where it has one), for
  wrapping a library error into a one-line `UserError`."""
  text = str(getattr(e, "message", "") or e).strip()
  # TensorStore (under Orbax) appends a repr of its spec to the sentence that matters.
  text = text.split(" See full TensorStore details")[0]
  return text.splitlines()[0] if text else type(e).__name__
