"""
configurator.py — nanoGPT-style configuration, with errors instead of surprises.

Every script keeps its hyperparameters as plain globals at its top, so a reader sees them first. Then

    python train.py config/lille_130m.py --batch_size=8 --compile=False

applies the preset file (a small Python file of assignments), then each --key=value override, in order.
Like nanoGPT's, a key the script does not define is an error; here it is one line that names it (with the keys
it may have meant), and a value must have its default's type (an int may stand for a float; None defaults accept
anything). check_values() then holds each value to its rule (a choice from a list, a number in a range).

That is all this file does. What the data and the checkpoint say about the run (the tokenizer, the vocabulary,
the architecture) is resolved by the script that runs: train.py's resolve().
"""
import ast
import os


class ConfigError(ValueError):
    pass


def read_config_file(path):
    """Run a preset file and return the names it assigns (it may import math, compute values, etc.)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    scope = {}
    with open(path) as f:
        text = f.read()
    try:
        code = compile(text, path, "exec")
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    try:
        exec(code, scope)
    except Exception as e:  # a preset may compute values; its mistakes are named with the file
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in scope.items() if not k.startswith("_") and not callable(v)
            and type(v).__name__ != "module"}


def _check_type(key, value, default, source, declared=None):
    """value as its default's type; a key whose default is None takes the `declared` type (or anything)."""
    if default is None and declared is not None and value is not None:
        default = declared()  # 0, 0.0, '' or False: a stand-in of the declared type
    if default is None or value is None:
        return value
    kind = type(default).__name__
    rule = f"its default {default!r} is a {kind}" if declared is None else f"it must be of type {kind} (or None)"
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if not isinstance(value, type(default)) or isinstance(default, bool) != isinstance(value, bool):
        raise ConfigError(f"{source}: {key}={value!r} is a {type(value).__name__}, but {rule}")
    return value


def _parse_value(text):
    """'3e-4' -> 0.0003, 'False' -> False, "(0.9, 0.95)" -> tuple; anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def configure(defaults, argv, types=None):
    """Return a copy of `defaults` updated by the preset files and --key=value overrides in argv. types: key ->
    type for keys whose default is None (distill.py's student shape: None = the teacher's), checked as others."""
    config, types = dict(defaults), types or {}
    for arg in argv:
        if not arg.startswith("--"):
            for key, value in read_config_file(arg).items():
                if key not in config:
                    raise ConfigError(f"{arg}: unknown config key '{key}'")
                config[key] = _check_type(key, value, defaults[key], arg, types.get(key))
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"override '{arg}' must look like --key=value")
            if key not in config:
                close = [k for k in config if k.startswith(key[:4])]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"unknown config key '{key}'{hint}")
            as_text = isinstance(defaults[key], str) or types.get(key) is str
            value = text if as_text else _parse_value(text)  # paths stay strings
            config[key] = _check_type(key, value, defaults[key], arg, types.get(key))
    return config


def script_defaults(namespace):
    """The configurable globals of a script: the plain lower-case values defined above the call (nanoGPT's
    config_keys); UPPER_CASE names are the script's constants, not settings."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not k.isupper()
            and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}


def check_values(config, choices, at_least):
    """Every value against its rule, at start: `choices` key -> allowed values, `at_least` key -> lower bound,
    or (low, high): low <= value < high (a momentum of 1 never forgets, Adam's bias correction divides by 0)."""
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise ConfigError(f"{key}={config[key]!r}: expected one of {', '.join(map(str, allowed))}")
    for key, bound in at_least.items():
        low, high = bound if isinstance(bound, tuple) else (bound, float("inf"))
        if not low <= config[key] < high:
            below = f" and < {high}" if high < float("inf") else ""
            raise ConfigError(f"{key}={config[key]!r}: must be >= {low}{below}")



# ---- the other end of a command line: an expected error is one line ---------------------------------------------
EXPECTED = (ValueError, OSError, FloatingPointError)  # bad input, missing/unwritable files, a full disk, divergence


def run_script(main, argv, expected=()):
    """Every script's `if __name__ == "__main__"`: main(argv), with an expected error (above, plus `expected`)
    turned into one line naming what is wrong and exit status 1, and Ctrl-C into exit 130 without a traceback.
    Anything else is a bug in nanoforge, and keeps its traceback."""
    import errno
    import sys
    try:
        return main(argv)
    except KeyboardInterrupt:
        sys.exit(130)  # 128 + SIGINT, as a shell reports it
    except EXPECTED + tuple(expected) as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            sys.exit(f"error: no space left on the device{where}: free some disk space, then resume")
        sys.exit(f"error: {e}" if str(e) else f"error: {type(e).__name__}")
