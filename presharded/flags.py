"""The scripts' flags. Importing vLLM takes seconds (7-20 s), so every check
that can fail on bad input runs first, on a parse of the few flags it needs
with plain argparse (`parse_for_checks`); the parse with every vLLM engine
flag comes after (`parse_engine_flags`)."""

import argparse
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from presharded.errors import UserError

AddFlags = Callable[[argparse.ArgumentParser], None]


def parse_size(text: str) -> int:
    """Bytes from `5000000`, `500MB` or `5G` (powers of 1000), `512MiB` (of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 5GB or 500MiB)")
    number, unit, binary = m.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " kmgt".index(unit or " "))


def normalize(argv: Sequence[str]) -> list[str]:
    """The command line in one spelling: vLLM's parser takes --tensor_parallel_size as well as
    --tensor-parallel-size, and --a=b as well as --a b (kept joined where b looks like a flag)."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            key = key.replace("_", "-")
            out += [key, value] if eq and not value.startswith("-") else [key + eq + value]
        else:
            out.append(arg)
    return out


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and exits 2
        raise UserError(f"{message}; see --help")


def positive_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r} (try 5GB or 500MiB)")
    return size


def config_file_args(path: str, known: set[str]) -> list[str]:
    """The flags of a --config YAML file that the early parse knows, as vLLM
    reads them: before the command line's, which win."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read --config {path} ({e}); pass a YAML file of engine flags")
    if not isinstance(values, dict):
        raise UserError(f"--config {path} is not a mapping of flags to values; see vLLM's --config")
    args = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        if flag.removeprefix("--").replace("-", "_") not in known or value is False or value is None:
            continue
        args += [flag] if value is True else [flag, str(value)]
    return args


def parse_for_checks(argv: Sequence[str], add_flags: AddFlags, description: str) -> argparse.Namespace:
    """The script's own flags and the engine flags its checks need, from the
    command line and a --config file; the rest is left for vLLM's parser,
    which also answers --help (and exits)."""
    if {"-h", "--help"} & set(argv):
        parse_engine_flags(argv, add_flags, description)
    parser = _OneLineErrors(add_help=False, allow_abbrev=False)
    parser.add_argument("--config", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--revision", default=None)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=None)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=None)
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=None)
    parser.add_argument("--load-format", default=None)
    parser.add_argument("--quantization", "-q", default=None)
    parser.add_argument("--nnodes", "-n", type=int, default=None)
    parser.add_argument("--node-rank", "-r", type=int, default=None)
    parser.add_argument("--master-addr", default=None)
    parser.add_argument("--master-port", type=int, default=None)
    add_flags(parser)
    argv = normalize(argv)
    args, _ = parser.parse_known_args(argv)
    if args.config:
        args, _ = parser.parse_known_args(config_file_args(args.config, set(vars(args))) + argv)
    check_counts(args)
    return args


def engine_argv(argv: Sequence[str], add_flags: AddFlags) -> list[str]:
    """`argv` without the script's own flags and --model: the engine flags as the user gave them."""
    parser = _OneLineErrors(add_help=False, allow_abbrev=False)
    parser.add_argument("--model")
    add_flags(parser)
    return parser.parse_known_args(normalize(argv))[1]


def check_counts(args: argparse.Namespace) -> None:
    """Sizes the engine needs at least one of, and a node among the nodes."""
    for dest in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "nnodes"):
        if (value := getattr(args, dest)) is not None and value < 1:
            raise UserError(f"--{dest.replace('_', '-')} {value}: use 1 or more")
    nodes = args.nnodes or 1
    if args.node_rank is not None and not 0 <= args.node_rank < nodes:
        raise UserError(f"--node-rank {args.node_rank}: with --nnodes {nodes}, use 0 to {nodes - 1}")
    if args.master_port is not None and not 0 < args.master_port < 2**16:
        raise UserError(f"--master-port {args.master_port}: use a port from 1 to 65535")


def parse_engine_flags(
    argv: Sequence[str], add_flags: AddFlags, description: str, defaults: dict | None = None
) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Every vLLM engine flag plus the script's own."""
    from vllm import EngineArgs

    from presharded.vllm_compat import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description=description)
    EngineArgs.add_cli_args(parser)
    add_flags(parser)
    parser.set_defaults(**(defaults or {}))
    parser.error = _OneLineErrors.error.__get__(parser)
    return parser.parse_args(list(argv)), parser


def is_default(args: argparse.Namespace, parser: argparse.ArgumentParser, dest: str) -> bool:
    return getattr(args, dest) == parser.get_default(dest)


def fill_unset(args: argparse.Namespace, parser: argparse.ArgumentParser, values: dict) -> None:
    for dest, value in values.items():
        if is_default(args, parser, dest):
            setattr(args, dest, value)
