"""Generate text with GPT-2 from the command line.

    python main.py --prompt "Alan Turing theorized that computers would one day become" --greedy
    python main.py --prompt "Once upon a time" --top_k 40 --num_samples 3 --model_type 355M
    python main.py --prompt_file prompts.txt --model_dir path/to/model --stream --stop_at_eot
    python main.py --interactive --stream
    python main.py --prompt "Once upon a time" --quantize int8      # int8 weights: faster on a CPU

Prints only the generated continuation of each prompt. The release sizes are downloaded into --models_dir on first
use; --model_dir takes any folder in OpenAI's layout or Hugging Face's (config.json + model.safetensors). Exit codes
are cli.py's: 2 for a request that cannot be served as asked, 1 for a failure (network, damaged files).
"""
import argparse
import os
import secrets
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

import cli
import gpt
import sampling
import weights
from cli import UsageError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass  # the docstring's examples as written, and each option's default


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--prompt", help="the text to continue")
    ap.add_argument("--prompt_file", help="a UTF-8 file with one prompt per line (blank lines skipped), run as one "
                                          "batch")
    ap.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF")
    ap.add_argument("--model_type", default="124M", choices=weights.MODEL_SIZES, help="OpenAI's release size")
    ap.add_argument("--models_dir", default="models", help="where the releases are downloaded")
    ap.add_argument("--model_dir", help="a model folder (OpenAI's, Hugging Face's or train.py's layout), instead of "
                                        "--model_type")
    ap.add_argument("--n_tokens_to_generate", type=int, default=40, help="new tokens per continuation")
    ap.add_argument("--greedy", action="store_true", help="always take the most likely token")
    ap.add_argument("--temperature", type=float, default=1.0, help="divides the logits before sampling: lower is "
                                                                   "more conservative")
    ap.add_argument("--top_k", type=int, help="sample from the k most likely tokens only")
    ap.add_argument("--top_p", type=float, help="sample from the smallest set of tokens with probability >= p")
    ap.add_argument("--seed", type=int, help="seed of the sampling (0 to 2**63 - 1); without it a fresh one is drawn "
                                             "and printed, so that a run can be repeated")
    ap.add_argument("--num_samples", type=int, default=1, help="continuations per prompt")
    ap.add_argument("--stop_at_eot", action="store_true", help="end a continuation at <|endoftext|>")
    ap.add_argument("--stop", action="append", default=[], metavar="TEXT",
                    help="end a continuation before this text (repeat for several; Python escapes such as \\n are "
                         "read as the characters)")
    ap.add_argument("--repetition_penalty", type=float, help="HF's: a token already in the prompt or the "
                                                             "continuation has its logit divided (if positive) or "
                                                             "multiplied by this; 1 is none, ~1.2 is typical")
    ap.add_argument("--presence_penalty", type=float, help="OpenAI's (-2 to 2): subtracted from the logit of every "
                                                           "token already generated")
    ap.add_argument("--frequency_penalty", type=float, help="OpenAI's (-2 to 2): subtracted from a token's logit "
                                                            "once for each time it was generated")
    ap.add_argument("--logit_bias", action="append", default=[], metavar="ID=BIAS",
                    help="add BIAS (-100 to 100) to token ID's logit, e.g. 50256=-100 never ends the text (repeat "
                         "for several)")
    ap.add_argument("--stream", action="store_true", help="print the continuation as it is generated")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the weights and compute")
    ap.add_argument("--quantize", choices=["int8"], help="int8 weights (a scale per 32 values; activations float32): "
                                                        "~1/4 of the memory, ~2x the decoding speed on a CPU; "
                                                        "quantized once and kept in gptjax's cache")
    ap.add_argument("--kv_cache", choices=["float32", "bfloat16"], help="the KV cache's dtype (default: the compute "
                    "dtype's): bfloat16 halves its memory, so twice the rows fit in a batch; on a CPU slower")
    return cli.parse_args(ap, argv)


def read_prompts(args):  # -> the prompt texts of --prompt or --prompt_file
    if args.interactive:
        if args.prompt is not None or args.prompt_file is not None:
            raise UsageError("--interactive reads the prompts from stdin: leave out --prompt and --prompt_file")
        return []
    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError("give one of --prompt TEXT, --prompt_file FILE or --interactive")
    if args.prompt is not None:
        if not args.prompt:
            raise UsageError("the prompt is empty: give some text to continue")
        return [args.prompt]
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [line for line in f.read().splitlines() if line.strip()]
    except OSError as e:
        raise UsageError(f"cannot read --prompt_file {args.prompt_file}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{args.prompt_file} is not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                         f"UTF-8") from None
    if not prompts:
        raise UsageError(f"{args.prompt_file} holds no prompts (one per line; blank lines are skipped)")
    return prompts


def generate_texts(encoder, hparams, params, prompts, args, eot_token):
    """Generate for prompt texts, printing each continuation (headed by its prompt and sample number when there
    are several) or, with --stream, printing the single continuation as it comes."""
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {args.num_samples}")
    ids = [encoder.encode(p) for p in prompts]  # each prompt once: its samples are made batch by batch
    if args.stream and len(ids) * args.num_samples > 1:
        raise UsageError("--stream prints one continuation as it is generated: give one prompt and --num_samples 1")
    try:
        sampling.check_request(hparams, ids, args.n_tokens_to_generate, **args.options)
    except ValueError as e:
        raise UsageError(e) from None
    if args.seed_drawn:  # once the request is known to be good, and once a process
        print(f"seed {args.seed} (give --seed {args.seed} to repeat this sampling)", file=sys.stderr, flush=True)
        args.seed_drawn = False
    for rows, chunks in sampling.batch_streams(params, hparams, ids, args.n_tokens_to_generate,
                                               samples=args.num_samples, eot_token=eot_token,
                                               kv_dtype=args.kv_cache, **args.options):
        texts = sampling.text_stream(chunks, encoder.decode, [args.stop] * len(rows))
        if args.stream:
            for pieces in texts:
                print(pieces[0], end="", flush=True)
            print()
            return
        # printed batch by batch: 10,000 samples show as they come, and are not all kept
        for row, text in zip(rows, sampling.joined(texts)):
            if len(ids) * args.num_samples > 1:
                print(heading(row, len(prompts), args.num_samples))
            print(text, flush=True)


def sampling_options(args):  # main.py's flags -> sampling.request_controls's options
    bias = {}
    for item in args.logit_bias:
        token, _, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise UsageError(f"--logit_bias {item}: give a token id and a bias, as 50256=-100") from None
    return dict(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, logit_bias=bias)


def stop_strings(stops):  # --stop's texts with their escapes (\n, \t, \u00e9) read as the characters
    out = []
    for stop in stops:
        try:
            out.append(stop.encode("latin-1", "backslashreplace").decode("unicode_escape"))
        except UnicodeDecodeError:
            raise UsageError(f"--stop {stop}: a backslash begins an escape such as \\n; write \\\\ for a "
                             f"backslash") from None
    return out


def heading(row, n_prompts, n_samples):  # "--- prompt 2, sample 1 ---" above each of several continuations
    p, s = divmod(row, n_samples)
    names = [f"prompt {p + 1}"] * (n_prompts > 1) + [f"sample {s + 1}"] * (n_samples > 1)
    return f"--- {', '.join(names)} ---"


def sampling_seed(args):  # -> (--seed, or when sampling without one a fresh seed; whether it was drawn)
    # a drawn seed is printed (generate_texts) so that the run can be repeated; greedy decoding needs none
    if args.seed is not None:
        try:
            sampling.check_seed(args.seed)
        except ValueError as e:
            raise UsageError(e) from None
        return args.seed, False
    if args.greedy:
        return 0, False
    return secrets.randbelow(2**31), True


def read_interactive_prompts():  # stdin's lines, with a ready marker and, on a terminal, a prompt sign
    print("ready: type a prompt and press Enter (Ctrl-D to end)", file=sys.stderr, flush=True)
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def run(args):
    prompts = read_prompts(args)
    args.seed, args.seed_drawn = sampling_seed(args)
    args.stop, args.options = stop_strings(args.stop), sampling_options(args)
    if args.model_dir is not None and not os.path.isdir(args.model_dir):
        raise UsageError(f"--model_dir {args.model_dir} is not a folder: give a model folder, or --model_type")
    cli.setup()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    if dtype is not None and (args.quantize or (args.model_dir and weights.stored_quantized(Path(args.model_dir)))):
        raise UsageError("--dtype bfloat16 does not go with int8 weights, whose activations are float32: leave out "
                         "--dtype")
    if dtype is not None and jax.default_backend() == "cpu":
        # measured (bench.py --dtype): 124M at batch 1 decodes 0.65x, at batch 8 0.72x as fast as in float32
        print("note: on a CPU bfloat16 halves the weights' memory but decodes ~1.5x slower than float32 (XLA:CPU has "
              "no fast bfloat16 matrix-vector product); leave out --dtype for speed", file=sys.stderr, flush=True)
    if args.kv_cache == "bfloat16" and dtype is None and jax.default_backend() == "cpu":
        # measured (bench.py generate --kv_cache bfloat16): 124M int8 after 880 cached positions, batch 1 12.4 ->
        # 21.8 ms a step, batch 8 46 -> 109 ms: XLA:CPU widens the bfloat16 cache in a slow loop inside attention
        print("note: on a CPU a bfloat16 KV cache halves the cache's memory but decodes long contexts ~2x slower; "
              "leave out --kv_cache for speed", file=sys.stderr, flush=True)
    encoder, hparams, params = weights.load_encoder_hparams_and_params(args.model_dir or args.model_type,
                                                                       args.models_dir, dtype, args.quantize)
    params = gpt.unstack_layers(params)  # once, rather than on every generate call
    eot_token = None
    if args.stop_at_eot:
        if encoder.eot_token is None:
            raise UsageError("--stop_at_eot: this model's vocabulary has no <|endoftext|> token")
        eot_token = encoder.eot_token
    if not args.interactive:
        return generate_texts(encoder, hparams, params, prompts, args, eot_token)
    for line in read_interactive_prompts():  # the compiled functions are kept between prompts: only a new shape
        try:                                 # bucket compiles
            generate_texts(encoder, hparams, params, [line], args, eot_token)
        except ValueError as e:  # a prompt too long, say: report it and go on with the next one
            print(f"error: {e}", file=sys.stderr, flush=True)


def main(argv=None):
    return cli.run(lambda argv: run(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
