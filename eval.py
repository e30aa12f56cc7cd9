"""Evaluate a GPT-2 the way the field compares them: EleutherAI's lm-evaluation-harness (lm_eval) with gptjax as its
model (harness.py). Needs the eval extra: pip install -e ".[eval]".

    python eval.py --model_type 124M --tasks hellaswag,lambada_openai,wikitext
    python eval.py --model_dir out --tasks hellaswag --limit 200 --output_path results.json
    python eval.py --model_dir testdata/gpt2-tiny --tasks tiny_choice,tiny_rolling --include_path testdata/eval

The options are the harness's own where it has them (--tasks, --num_fewshot, --limit, --batch_size, --include_path,
--output_path, --seed). Datasets are the harness's to fetch (from the Hugging Face hub); offline, a task YAML over local
files (--include_path) works. Prints the harness's results table.
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import cli
import files
import weights
from cli import UsageError


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = ap.add_mutually_exclusive_group()
    model.add_argument("--model_type", default="124M", choices=weights.MODEL_SIZES, help="OpenAI's release size")
    model.add_argument("--model_dir", help="a model folder (OpenAI's, Hugging Face's or train.py's layout)")
    ap.add_argument("--models_dir", default="models", help="where the releases are downloaded")
    ap.add_argument("--tasks", required=True, help="comma-separated task names (lm_eval's, or --include_path's)")
    ap.add_argument("--num_fewshot", type=int, help="examples in each prompt (default: each task's own)")
    ap.add_argument("--limit", type=float, help="at most this many examples per task (or a fraction of them, < 1)")
    ap.add_argument("--batch_size", type=int, default=8, help="requests scored together")
    ap.add_argument("--include_path", help="a folder of task YAML files of your own")
    ap.add_argument("--output_path", help="write the results as JSON to this file, or into this folder as "
                                          "results_<date>.json (the harness's way)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the harness's few-shot sampling and shuffling")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the weights and compute")
    return cli.parse_args(ap, argv)


def evaluate(args):
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError('eval.py needs lm-evaluation-harness: pip install -e ".[eval]"')
    if args.limit is not None and not (math.isfinite(args.limit) and args.limit > 0):
        raise UsageError(f"--limit must be a positive number (a count, or a fraction below 1), got {args.limit:g}")
    if args.limit is not None and args.limit > 1 and not args.limit.is_integer():
        raise UsageError(f"--limit above 1 is a count of examples: give a whole number, got {args.limit:g}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num_fewshot must be 0 or more, got {args.num_fewshot}")
    output = output_file(args.output_path) if args.output_path else None  # before hours of evaluation, not after
    if args.model_dir is not None and not Path(args.model_dir).is_dir():
        raise UsageError(f"--model_dir {args.model_dir} is not a folder: give a model folder, or --model_type")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UsageError(f"--include_path {args.include_path} is not a folder of task YAML files")
    import lm_eval  # the eval extra: imported once known to be there
    from lm_eval.utils import make_table

    import harness
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    manager = task_manager(args.include_path, tasks)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown task {unknown[0]!r}: see `lm_eval --tasks list`, or give --include_path for a "
                         f"task of your own")
    cli.setup()
    model = harness.GptjaxLM(args.model_dir or args.model_type, args.models_dir, args.batch_size,
                             None if args.dtype == "float32" else args.dtype)
    try:
        results = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                          task_manager=manager, random_seed=args.seed, numpy_random_seed=args.seed,
                                          fewshot_random_seed=args.seed, log_samples=False)
    except FileNotFoundError as e:  # a local task's data file
        raise FileNotFoundError(f"a task's data file is missing ({e}): check the data_files in its YAML (a relative "
                                f"path is read from the folder eval.py runs in)") from None
    except (ConnectionError, OSError) as e:  # the hub: offline, a task's dataset cannot be fetched
        raise ConnectionError(f"a task's dataset could not be loaded ({e}); offline, use a task of your own over "
                              f"local files (--include_path)") from None
    print(make_table(results))
    if output:
        with files.atomic_write(output, "w") as f:
            f.write(json.dumps(results, indent=2, default=str))
        print(f"wrote {output}")


def task_manager(include_path, tasks):
    """lm_eval's index of the tasks it can run: include_path's alone when that folder holds every task asked for
    (indexing the harness's own library of thousands of YAML files takes 10 to 30 seconds), else the library's and
    include_path's together."""
    from lm_eval.tasks import TaskManager
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return TaskManager(include_path=include_path)


def output_file(path) -> Path:
    """--output_path -> the file the results go to: path itself, or inside a folder (an existing one, or a path
    ending in /) results_<date>.json. Its folder must exist and be writable, and no link may stand where it goes."""
    path = Path(path)
    if path.is_dir() or str(path).endswith(("/", os.sep)):
        path = path / f"results_{datetime.datetime.now():%Y-%m-%dT%H-%M-%S}.json"
    if not path.parent.is_dir():
        raise UsageError(f"--output_path: {path.parent} is not a folder; create it, or give another path")
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"--output_path: {path.parent} cannot be written; give another path")
    files.refuse_link(path)
    if path.exists() and not path.is_file():
        raise UsageError(f"--output_path: {path} is not a file; give another path")
    return path


def main(argv=None):
    return cli.run(lambda argv: evaluate(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
