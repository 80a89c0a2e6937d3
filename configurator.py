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


def _check_type(key, value, default, source):
    if default is None or value is None:
        return value
    if isinstance(default, bool) != isinstance(value, bool):
        raise ConfigError(f"{source}: {key}={value!r} must be a bool like its default {default!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if not isinstance(value, type(default)):
        raise ConfigError(f"{source}: {key}={value!r} is a {type(value).__name__}, "
                          f"but its default {default!r} is a {type(default).__name__}")
    return value


def _parse_value(text):
    """'3e-4' -> 0.0003, 'False' -> False, "(0.9, 0.95)" -> tuple; anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def configure(defaults, argv):
    """Return a copy of `defaults` updated by the preset files and --key=value overrides in argv."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            for key, value in read_config_file(arg).items():
                if key not in config:
                    raise ConfigError(f"{arg}: unknown config key '{key}'")
                config[key] = _check_type(key, value, defaults[key], arg)
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"override '{arg}' must look like --key=value")
            if key not in config:
                close = [k for k in config if k.startswith(key[:4])]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"unknown config key '{key}'{hint}")
            value = text if isinstance(defaults[key], str) else _parse_value(text)  # paths stay strings
            config[key] = _check_type(key, value, defaults[key], arg)
    return config


def script_defaults(namespace):
    """The configurable globals of a script: the plain lower-case values defined above the call (nanoGPT's
    config_keys); UPPER_CASE names are the script's constants, not settings."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not k.isupper()
            and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}


def check_values(config, choices, at_least):
    """Every value against its rule, at start: `choices` key -> allowed values, `at_least` key -> lower bound."""
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise ConfigError(f"{key}={config[key]!r}: expected one of {', '.join(map(str, allowed))}")
    for key, low in at_least.items():
        if config[key] < low:
            raise ConfigError(f"{key}={config[key]!r}: must be >= {low}")
