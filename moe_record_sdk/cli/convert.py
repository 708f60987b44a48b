"""``moe-record convert IN... -o OUT [--to FORMAT]``: other engines' statistics to ours, ours to engines'."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..client._models import run_file_kind
from ..convert import TARGETS, read_inputs, write
from ..convert.trtllm import is_trtllm_folder
from ..errors import MoeRecordError
from ..schema.dump import Dump
from ..schema.sglang import SGLANG_DUMP_NAME
from . import add_command

INPUTS_HELP = (
    "dump files (ours, SGLang .pt or legacy .csv), folders `moe-record record --out` wrote (their merged dump), "
    "SGLang dump folders (their expert_distribution_recorder_* files), "
    "TensorRT-LLM expert statistic folders "
    "(meta_info.json + rank{R}.safetensors), or Megatron tokens_per_expert/rank{R}.jsonl files"
)


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return value


def add_input_options(p: argparse.ArgumentParser) -> None:
    """Options every command that reads foreign inputs shares."""
    p.add_argument(
        "--megatron-ep-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="Megatron's expert-parallel size (default 1)",
    )
    p.add_argument(
        "--num-layers",
        type=positive_int,
        default=None,
        metavar="L",
        help="decoder layers of the model, for foreign inputs whose last layers recorded nothing",
    )


def read_args_inputs(args: argparse.Namespace, paths: list[str], *, merges: bool = False) -> list[tuple[str, Dump]]:
    files = resolve_record_folders(paths, merges=merges)
    return read_inputs(files, megatron_ep_size=args.megatron_ep_size, num_layers=args.num_layers)


def resolve_record_folders(paths: Sequence[str], *, merges: bool) -> list[str]:
    """``paths`` with each folder that ``moe-record record --out`` (or ``demo``) wrote replaced by
    the dump to read there: its ``merged.*``; else its one ``engine-*`` dump; else, for a command
    that merges its inputs (``merges``), all its ``engine-*`` dumps (record could not merge them;
    the merge says why again). A folder of SGLang dumps (``SGLANG_DUMP_NAME``, e.g. the ranks'
    ``per_pass`` files), as SGLang's own ``read_mode_per_pass(dir)`` takes: its one dump, or all of
    them where the command merges. A TensorRT-LLM folder stays; any other folder is refused. The
    names are ``FleetResult.save``'s: ``engine-<i>-<host>_<port>.<format>``, ``merged.<format>``."""
    out: list[str] = []
    for path in paths:
        if not os.path.isdir(path) or is_trtllm_folder(path):
            out.append(path)  # read_inputs reads (or refuses) it
            continue
        names = sorted(os.listdir(path))
        engine_files = [n for n in names if run_file_kind(n) == "engine"]
        merged_files = [n for n in names if run_file_kind(n) == "merged"]
        sglang_files = [n for n in names if SGLANG_DUMP_NAME.search(n)]
        if len(merged_files) > 1:
            raise MoeRecordError(
                f"{path}: holds {len(merged_files)} merged dumps ({', '.join(merged_files)}): pass one of them"
            )
        if merged_files or len(engine_files) == 1 or (engine_files and merges):
            out.extend(os.path.join(path, n) for n in merged_files or engine_files)
        elif engine_files:
            raise MoeRecordError(
                f"{path}: holds {len(engine_files)} engine dumps ({_some(engine_files)}) and no merged.* (record "
                "could not merge them): pass the engine-* files themselves, or merge them (summary --merge and "
                f"eplb merge them; or `moe-record merge {path} -o FILE`)"
            )
        elif len(sglang_files) == 1 or (sglang_files and merges):
            out.extend(os.path.join(path, n) for n in sglang_files)
        elif sglang_files:
            raise MoeRecordError(
                f"{path}: holds {len(sglang_files)} SGLang dumps ({_some(sglang_files)}): pass the files themselves, "
                f"or merge them (summary --merge and eplb merge them; or `moe-record merge {path} -o FILE`)"
            )
        else:
            holds = f"it holds: {_some(names)}" if names else "it is empty"
            raise MoeRecordError(
                f"{path}: a folder without the dumps `moe-record record --out` writes (engine-*, merged.*), SGLang's "
                f"(expert_distribution_recorder_*) or a TensorRT-LLM statistic's meta_info.json ({holds}): pass "
                "dump files"
            )
    return out


def _some(names: list[str], shown: int = 4) -> str:
    """The first few ``names``, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


ALLOW_PARTIAL_HELP = "merge even if token shards or pipeline stages are missing"


def merged(dumps: list[tuple[str, Dump]], allow_partial: bool = False) -> tuple[str, Dump]:
    """One run from several inputs, by ``moe_record_sdk.merge``'s rules (ranks and engines)."""
    from ..merge import merge_dumps

    labels = [label for label, _ in dumps]
    refuse_merge_beside_its_inputs(labels)
    return f"merged({', '.join(labels)})", merge_dumps(
        [d for _, d in dumps], sources=labels, allow_partial=allow_partial
    )


def refuse_merge_beside_its_inputs(files: Sequence[str]) -> None:
    """Refuse a ``merged.*`` given with ``engine-*`` files of the same folder: ``record --out``
    writes both (``run/*.pt`` picks up both), and the merge already sums those engines."""
    by_folder: dict[str, list[str]] = {}
    for f in files:
        by_folder.setdefault(os.path.dirname(os.path.abspath(f)), []).append(f)
    for group in by_folder.values():
        names = [os.path.basename(f) for f in group]
        if any(run_file_kind(n) == "engine" for n in names):
            twice = next((f for f, n in zip(group, names) if run_file_kind(n) == "merged"), None)
            if twice:
                raise MoeRecordError(
                    f"{twice} is `moe-record record`'s merge of the engine-* dumps also given: every engine would "
                    "count twice (give the engine-* files, or the merged file alone)"
                )


def check_outputs(inputs: Sequence[str], outputs: Sequence[str | None]) -> None:
    """Refuse an output that would replace an input, land in a folder read as input (the next
    run would read it back), or take the path of another output of the same command."""
    read = {os.path.realpath(p): p for p in inputs}
    folders = [os.path.realpath(p) for p in inputs if os.path.isdir(p)]
    taken: set[str] = set()
    for out in filter(None, outputs):
        real = os.path.realpath(out)
        if real in read:
            raise MoeRecordError(f"{out}: is also an input ({read[real]}); write the output elsewhere")
        inside = next((f for f in folders if real.startswith(f + os.sep)), None)
        if inside:
            raise MoeRecordError(f"{out}: inside {inside}, a folder read as input; write the output elsewhere")
        if real in taken:
            raise MoeRecordError(f"{out}: given for two outputs; give each its own file")
        taken.add(real)


def fail(command: str, error: Exception, flags: dict[str, str] | None = None) -> int:
    """Print the error for ``command``; exit status 2. ``flags``: the words the analysis functions'
    argument checks (ValueError) use (``num_gpus=``) and the command's flag to say instead (``--gpus ``)."""
    message = str(error)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        # "path: cause" like our other errors, not Python's "[Errno 2] cause: 'path'".
        message = f"{error.filename}: {error.strerror}"
    elif isinstance(error, ValueError):
        for words, flag in (flags or {}).items():
            message = message.replace(words, flag)
    print(f"moe-record {command}: {message}", file=sys.stderr)
    return 2


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        sub,
        "convert",
        description="Read one run (a file, a TensorRT-LLM folder, or Megatron's rank files) and write it in another format.",
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help=INPUTS_HELP)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the file to write")
    p.add_argument(
        "--to",
        choices=TARGETS,
        default=None,
        help="msgpack/json/pt: our dump (pt is SGLang's layout plus our metadata); sglang-pt: SGLang's "
        "stat .pt exactly (--init-expert-location takes it); tensor: a .pt of the int64 [L, E] totals. "
        "Default: from OUT's suffix",
    )
    add_input_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        check_outputs(args.inputs, [args.output])
        dumps = read_args_inputs(args, args.inputs)
        if len(dumps) != 1:
            raise MoeRecordError(
                f"{len(dumps)} runs given ({', '.join(label for label, _ in dumps)}); convert writes one: "
                "convert them one by one, or merge them first"
            )
        label, dump = dumps[0]
        path = write(dump, args.output, args.to)
    except (MoeRecordError, OSError, ValueError) as e:
        return fail("convert", e)
    L, E = dump.model.num_layers, dump.model.num_logical_experts
    print(
        f"{label} ({dump.engine.name}, {dump.window.mode}, {dump.logical_count.shape[0]} rows x {L} layers x {E} experts) -> {path}"
    )
    return 0
