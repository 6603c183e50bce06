"""
Poor man's configurator, after nanoGPT's configurator.py. Usage from train.py:

    from configurator import apply_config
    apply_config(globals(), sys.argv[1:])

    $ python train.py config/finetune_dante.py --model_name dante --max_iters 1100 --compile

Positional arguments are Python config files, exec'd in order; each `--key=value`
or `--key value` overrides one value, and a bare `--flag` sets a bool key to True.
Arguments apply left to right, so later ones win.

Differences from nanoGPT's version (a script exec'd straight into train.py's globals):
- it is an importable function that mutates and returns the config dict, so it can be tested;
- `--key value` and bare bool flags work, not only `--key=value`;
- unknown keys raise with a "did you mean", also when a config file assigns them,
  so a typo never silently does nothing;
- an int is accepted (as float) for a float key; bool never passes for int; str keys take
  the raw text; a None default accepts anything;
- config file values get the same type check as command-line ones;
- every error is a ConfigError (a ValueError), so a CLI can print it and exit without a traceback.
"""
import ast
import difflib
import os
import types

from core.errors import ClearError

def say(*args):
    if os.environ.get('RANK', '0') == '0': # under torchrun every process reads the config: only the first one says so
        print(*args)

# only globals holding plain values are config; modules, functions, classes never are
SIMPLE_TYPES = (bool, int, float, str, type(None), tuple, list)


class ConfigError(ClearError):
    pass


def config_keys(config):
    return {k for k, v in config.items() if not k.startswith('_') and isinstance(v, SIMPLE_TYPES)}


def check_known(key, keys, source):
    if key in keys:
        return
    close = difflib.get_close_matches(key, sorted(keys), n=3)
    hint = f"Did you mean: {', '.join(close)}?" if close else \
        f"No close match; the config keys are: {', '.join(sorted(keys))}"
    raise ConfigError(f"Unknown config key {key!r} (from {source}). {hint}")


def check_type(key, value, current):
    if current is None:
        return value  # no default type to enforce
    if type(current) is float and type(value) is int:
        return float(value)  # `--learning_rate 1` plainly means 1.0
    # exact type match: isinstance would let True pass for an int key
    if type(value) is not type(current):
        hint = ' (must be True or False)' if type(current) is bool else ''
        raise ConfigError(f"Type mismatch for {key!r}: expected {type(current).__name__}, "
                          f"got {value!r} ({type(value).__name__}){hint}")
    return value


def parse_value(raw, current):
    if isinstance(current, str):
        return raw  # a str key takes the text as typed: `--model_name 123` is '123'
    try:
        return ast.literal_eval(raw)
    except Exception:  # literal_eval raises several kinds; anything it can't read is plain text
        return raw


def iter_tb(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def apply_file(config, keys, path, given=None):
    if os.path.isdir(path):
        raise ConfigError(f"Config file {path!r} is a directory; expected a Python config file in it, "
                          f"e.g. {os.path.join(path, 'train_standard.py')!r}")
    if not os.path.isfile(path):
        raise ConfigError(f"Config file not found: {path!r} "
                          "(positional arguments are config files; overrides look like --key=value)")
    try:
        with open(path, encoding='utf-8') as f:
            src = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Config file {path!r} could not be read as text ({e}); config files are Python files") from None
    say(f"Overriding config with {path}:")
    say(src)
    # seed with the current values so a file can build on them (e.g. batch_size = batch_size * 2)
    seed = {k: config[k] for k in keys}
    ns = dict(seed)
    try:
        exec(compile(src, path, 'exec'), ns)
    except Exception as e: # the file is the user's code: say where it broke, not our traceback
        line = getattr(e, 'lineno', None) or next((tb.tb_lineno for tb in iter_tb(e.__traceback__)
                                                   if tb.tb_frame.f_code.co_filename == path), '?')
        raise ConfigError(f"Config file {path!r} failed at line {line}: {type(e).__name__}: {e}. "
                          "Config files are Python that assigns config keys, e.g. batch_size = 32") from None
    for k, v in ns.items():
        # helpers the file imports or defines (import time, def f, _tmp) are not config
        if k.startswith('_') or callable(v) or isinstance(v, types.ModuleType):
            continue
        if k in seed and v is seed[k]:
            continue  # untouched by the file
        check_known(k, keys, path)
        config[k] = check_type(k, v, config[k])
    if given is not None: # what the file assigns, even a value equal to the current one (an int's identity says nothing)
        given.update(k for k in assigned_names(src) if k in keys)


def assigned_names(src):
    """ the names a config file assigns at its top level """
    names = set()
    for node in ast.parse(src).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def apply_config(config, argv, given=None):
    """ apply config files and --key=value overrides to config; `given` (a set), if passed, collects the keys the
    command line and files set, whatever their values """
    keys = config_keys(config)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith('--'):
            apply_file(config, keys, arg, given)
            continue
        key, has_eq, raw = arg[2:].partition('=')
        if not key:
            raise ConfigError(f"Malformed argument {arg!r}: expected --key=value or --key value")
        check_known(key, keys, 'the command line')
        if not has_eq:
            is_bool = type(config[key]) is bool
            if i < len(argv) and not argv[i].startswith('--') and not (is_bool and argv[i].endswith('.py')):
                raw = argv[i]  # `--key value` form
                i += 1
            elif is_bool:
                raw = 'True'  # bare `--compile` switches a bool on, also just before a config file
            else:
                raise ConfigError(f"--{key} needs a value (--{key}=value or --{key} value)")
        config[key] = check_type(key, parse_value(raw, config[key]), config[key])
        if given is not None:
            given.add(key)
        say(f"Overriding: {key} = {config[key]}")
    return config
