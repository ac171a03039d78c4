"""HourNAS in JAX: search, retrain or evaluate, as the config says.

    python main.py --config=configs/fbnet.py --workdir=/tmp/hournas_fbnet
    python main.py --config=configs/fbnet.py:b --workdir=/tmp/hournas_b          # HourNAS-B
    python main.py --config=configs/quickstart.py --workdir=/tmp/quickstart      # offline demo
    python main.py --config=configs/fbnet.py --workdir=/tmp/run --config.mode=train \\
        --config.train.arch=hournas_a

Any config field can be overridden with --config.FIELD=VALUE (see configs/default.py for the
schema); the config is locked, so a misspelt field is an error. Restarting a stopped run with
the same command continues it from its latest checkpoint.

Problems with the input (config, dataset, workdir, checkpoints, targets) end the run with one
`error: ...` line on stderr and a non-zero exit status (`errors.UserError`). SIGTERM (a
preempted machine) stops the run after the step in flight with its checkpoint saved, one line
and exit status 143; rerunning the same command continues it.
"""

import difflib
import os
import sys

# Quiet TensorFlow's C++ start-up lines (TF is only imported for TFDS and image-folder datasets;
# hournas_jax/data does the same for runs that skip main.py). Before any import that could load
# TF; a user's own values win.
from hournas_jax import tf_env  # pylint: disable=g-import-not-at-top,wrong-import-position
tf_env.quiet()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_dict  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections.config_flags import config_flags as config_flags_impl  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, results and TensorBoard logs.')
config_flags.DEFINE_config_file(
    'config', None, 'A config file (configs/*.py), optionally with a variant: '
    'configs/fbnet.py:b.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])

USAGE_EXIT = 2
ERROR_EXIT = 1


def fail(message: str, code: int = ERROR_EXIT):
  """Prints one `error: ...` line on stderr and exits with `code`."""
  message = ' '.join(str(message).split())
  print(f'error: {message}', file=sys.stderr, flush=True)
  if 'jax' in sys.modules and sys.modules['jax'].distributed.is_initialized():
    # JAX's exit handler waits at a shutdown barrier for every process, which a process that
    # has stopped never reaches (minutes, then an abort): leave at once.
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _config_arg(argv):
  """The value of --config (the file, with an optional :variant)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv):
  """(flag text, dotted field path) of every --config.FIELD override."""
  out = []
  for i, arg in enumerate(argv):
    if arg.startswith('--config.'):
      body = arg[len('--config.'):]
      path = body.split('=', 1)[0]
      out.append((arg, path))
    elif arg.startswith('--noconfig.'):
      out.append((arg, arg[len('--noconfig.'):]))
  return out


def _unknown_field(config, path: str):
  """A message when `path` is not a field of `config`, else None."""
  node, walked = config, []
  for part in path.split('.'):
    if isinstance(node, config_dict.ConfigDict) and part in node:
      node = node[part]
      walked.append(part)
      continue
    if not isinstance(node, config_dict.ConfigDict):
      return f'{".".join(walked)} is a {type(node).__name__}, it has no field {part!r}'
    here = '.'.join(walked)
    close = difflib.get_close_matches(part, list(node.keys()), n=3)
    hint = f'; did you mean {", ".join(".".join(walked + [c]) for c in close)}?' if close else ''
    where = f'config.{here}' if here else 'the config'
    return f'unknown config field {".".join(walked + [part])!r} ({where} has no {part!r}){hint}'
  return None


def _describe_parse_error(argv, error: Exception) -> str:
  config_arg = _config_arg(argv)
  if config_arg:
    path = config_arg.split(':', 1)[0]
    if not os.path.isfile(path):
      return f'config file {path!r} not found'
    try:
      config = config_flags_impl.ConfigFileFlagParser('config').parse(config_arg)
    except Exception as e:  # pylint: disable=broad-except
      return f'config file {config_arg!r} failed to load: {str(e).strip().splitlines()[-1]}'
    for flag, field in _overrides(argv):
      message = _unknown_field(config, field)
      if message:
        return f'{message} (in {flag.split("=", 1)[0]}); the config is locked'
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def parse_flags(argv):
  """absl's flag parsing, but every problem is one `error:` line (no traceback, no usage)."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    fail(_describe_parse_error(argv, e) if 'config' in str(e) else str(e), USAGE_EXIT)
  except Exception as e:  # pylint: disable=broad-except
    # ml_collections raises AttributeError/KeyError/TypeError/ValueError for overrides of
    # fields that do not exist or values of the wrong type.
    fail(_describe_parse_error(argv, e), USAGE_EXIT)
  config = FLAGS.config
  if not isinstance(config, config_dict.ConfigDict):
    fail(_describe_parse_error(argv, IOError(f'config file {_config_arg(argv)!r} could not be '
                                             'loaded')), USAGE_EXIT)
  return rest


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}', USAGE_EXIT)
  if not FLAGS['verbosity'].present:
    # The INFO and WARNING logs of orbax, TFDS and absl are noise for a user (the run prints
    # its own progress); --verbosity=-1 (warnings) or 0 (info) brings them back.
    logging.set_verbosity(logging.ERROR)
  from hournas_jax import errors, train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.UserError as e:
    fail(e, e.exit_code)
  except Exception as e:  # pylint: disable=broad-except
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() > 1 and isinstance(e, jax.errors.JaxRuntimeError):
      first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
      fail(f'process {jax.process_index()} of {jax.process_count()}: a computation across the '
           f'processes failed, most likely because another process stopped ({first}); '
           'restart every process with the same command to continue from the latest '
           'checkpoint')
    raise
  except KeyboardInterrupt:
    fail('interrupted; rerun the same command to continue from the latest checkpoint', 130)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
