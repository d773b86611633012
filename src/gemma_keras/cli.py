"""The `gemma-keras` command (also `python -m gemma_keras`).

    gemma-keras generate "The capital of France is"
    gemma-keras chat --preset gemma3_instruct_270m
    gemma-keras presets
    gemma-keras convert model.gguf ./my_preset --to keras_hub
    gemma-keras bench --model embedded
    gemma-keras eval hellaswag_val.jsonl --limit 200
    gemma-keras info

`--backend` sets `KERAS_BACKEND` before Keras is imported; without it (and
without `KERAS_BACKEND`) JAX is used when installed. Exit codes: 0 success,
2 usage error, 1 runtime error, with a one-line message (`--debug` shows the
traceback).
"""

import argparse
import json
import os
import sys

# Importing it imports neither Keras nor a backend, which `--backend` may still choose.
from gemma_keras import benchmarking

DEFAULT_PRESET = "gemma3_270m_q4_k_m"


class UsageError(Exception):
    """Bad command-line usage: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _model_options(parser):
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"preset name, path, kaggle:// or hf:// handle (default {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "mixed_bfloat16", "float16", "mixed_float16"],
        help="weights and compute dtype (default float32)",
    )


def _sampling_options(parser):
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--sampler", choices=["greedy", "top_k", "top_p", "random"], default="greedy"
    )
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)


def _global_options(parser, default=None):
    """--backend, --json and --debug, before the command or after it (there with
    `default=argparse.SUPPRESS`, so that leaving them out keeps what came before)."""
    parser.add_argument(
        "--backend",
        choices=["jax", "tensorflow", "torch"],
        default=default,
        help="Keras backend (default: $KERAS_BACKEND, else JAX if installed)",
    )
    flag = {} if default is None else {"default": default}
    parser.add_argument("--json", action="store_true", help="machine-readable output", **flag)
    parser.add_argument("--debug", action="store_true", help="show tracebacks", **flag)


def build_parser():
    from gemma_keras import __version__

    parser = _Parser(prog="gemma-keras", description="Gemma language models on Keras 3.")
    parser.add_argument("--version", action="version", version=f"gemma-keras {__version__}")
    _global_options(parser)
    everywhere = _Parser(add_help=False)
    _global_options(everywhere, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    def command(name, **kwargs):
        return commands.add_parser(name, parents=[everywhere], **kwargs)

    generate = command("generate", help="continue a prompt (streamed)")
    generate.add_argument("prompt", nargs="+", help="one or more prompts")
    _model_options(generate)
    _sampling_options(generate)
    generate.add_argument("--no-stream", action="store_true", help="print when finished")
    generate.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap the prompt in the instruction-tuned chat template",
    )

    chat = command("chat", help="interactive multi-turn chat (/reset, /exit)")
    _model_options(chat)
    _sampling_options(chat)
    chat.add_argument("--system", help="a system instruction for the conversation")

    command("presets", help="list the preset registry")

    convert = command("convert", help="convert a checkpoint")
    convert.add_argument("source", help="a KerasHub preset, transformers directory or .gguf")
    convert.add_argument("destination", help="the directory to write")
    convert.add_argument("--to", choices=["keras_hub", "huggingface"], default="keras_hub")
    convert.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")

    bench = command("bench", help="generation speed against KerasHub, transformers and llama.cpp")
    benchmarking.add_arguments(bench, default_model="embedded")

    evaluate = command(
        "eval", help="multiple-choice accuracy on a JSONL file (HellaSwag's format too)"
    )
    evaluate.add_argument(
        "file",
        help='JSONL, one {"context", "choices", "label"} or {"ctx", "endings", "label"} a line',
    )
    _model_options(evaluate)
    evaluate.add_argument("--limit", type=int, help="evaluate the first N examples only")
    evaluate.add_argument("--batch-size", type=int, default=8, help="choices per forward pass")

    command("info", help="backend, devices, versions, cache location")
    return parser


def _sampler(args):
    """The sampler the options ask for, checked before the model loads."""
    # Numpy only: usage errors come before Keras and its backend load.
    from gemma_keras.samplers import Sampler, SamplerError, get_sampler, random_generator

    try:
        random_generator(args.seed)  # generate's own check of the seed
    except SamplerError as error:
        raise UsageError(f"--{error}") from None
    given = [args.temperature, args.top_k, args.top_p]
    if args.sampler == "greedy":
        if any(option is not None for option in given):
            raise UsageError("--temperature/--top-k/--top-p need --sampler top_k, top_p or random")
        return get_sampler("greedy")
    defaults = {"top_k": (5, None), "top_p": (None, 0.9)}.get(args.sampler, (None, None))
    top_k = defaults[0] if args.top_k is None else args.top_k
    top_p = defaults[1] if args.top_p is None else args.top_p
    temperature = 1.0 if args.temperature is None else args.temperature
    try:
        return Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    except SamplerError as error:
        message = str(error)  # "top_k must be ...": named as the option
        name = message.split()[0]
        raise UsageError("--" + name.replace("_", "-") + message[len(name) :]) from None


def _load(args):
    from gemma_keras import GemmaCausalLM

    return GemmaCausalLM.from_preset(args.preset, dtype=args.dtype)


def cmd_generate(args):
    from gemma_keras import apply_chat_template

    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    sampler = _sampler(args)
    model = _load(args)
    prompts = args.prompt
    if args.chat_template:
        prompts = [apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    options = dict(max_new_tokens=args.max_new_tokens, sampler=sampler, seed=args.seed)
    if args.json or args.no_stream or len(prompts) > 1:
        outputs = model.generate(prompts, strip_prompt=True, **options)
        if args.json:
            print(
                json.dumps(
                    [
                        {"prompt": p, "completion": c}
                        for p, c in zip(args.prompt, outputs, strict=True)
                    ]
                )
            )
        else:
            for prompt, output in zip(args.prompt, outputs, strict=True):
                print(prompt + output)
        return
    print(args.prompt[0], end="", flush=True)
    for piece in model.stream(prompts[0], **options):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args):
    sampler = _sampler(args)
    model = _load(args)
    conversation = model.start_chat(system=args.system, sampler=sampler, seed=args.seed)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            conversation.reset()
            print(json.dumps({"reset": True}) if args.json else "(conversation reset)")
            continue
        reply = conversation.send(text, max_new_tokens=args.max_new_tokens)
        print(
            json.dumps({"user": text, "model": reply}) if args.json else f"model> {reply}",
            flush=True,
        )


def cmd_presets(args):
    from gemma_keras import loading, registry, resolve

    rows = []
    for preset in registry.list_presets():
        sources = sorted(preset["sources"])
        cached = any(
            os.path.isdir(os.path.join(folder, preset["name"]))
            for folder in (resolve.cache_dir() / "presets", loading.converted_dir())
        )
        rows.append(
            {
                "name": preset["name"],
                "parameters": preset["parameter_count"],
                "sources": sources,
                "cached": cached,
                "instruction_tuned": preset["instruction_tuned"],
            }
        )
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'name':32} {'parameters':>14}  {'cached':6}  sources")
    for row in rows:
        print(
            f"{row['name']:32} {row['parameters']:>14,}  {'yes' if row['cached'] else 'no':6}  "
            f"{', '.join(row['sources'])}"
        )


def cmd_convert(args):
    from gemma_keras.loading import load_model

    model = load_model(args.source, dtype="float32")
    if args.to == "keras_hub":
        model.save_to_preset(args.destination, dtype=args.dtype)
    else:
        model.export_to_huggingface(args.destination, dtype=args.dtype)
    message = {"source": args.source, "destination": args.destination, "format": args.to}
    print(json.dumps(message) if args.json else f"wrote {args.to} checkpoint to {args.destination}")


def cmd_bench(args):
    benchmarking.run(args)


def cmd_eval(args):
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    from gemma_keras.evaluation import evaluate_multiple_choice, load_examples

    # The file is checked before the (slower) model load.
    examples = load_examples(args.file, args.limit)
    model = _load(args)
    result = evaluate_multiple_choice(model, examples, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"accuracy {result['accuracy']:.4f}  accuracy_norm {result['accuracy_norm']:.4f}  "
            f"n {result['n']}  ({args.file}, {args.preset})"
        )


def cmd_info(args):
    import platform

    import keras

    import gemma_keras
    from gemma_keras import resolve

    backend = keras.config.backend()
    devices = []
    if backend == "jax":
        import jax

        devices = [str(d) for d in jax.devices()]
    elif backend == "torch":
        import torch

        devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    elif backend == "tensorflow":
        import tensorflow as tf

        devices = [d.name for d in tf.config.list_logical_devices()]
    info = {
        "gemma_keras": gemma_keras.__version__,
        "keras": keras.__version__,
        "backend": backend,
        "devices": devices,
        "python": platform.python_version(),
        "cache": str(resolve.cache_dir()),
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:12} {value}")


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
    "presets": cmd_presets,
    "convert": cmd_convert,
    "bench": cmd_bench,
    "eval": cmd_eval,
    "info": cmd_info,
}


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        print(str(error), file=sys.stderr)
        return 2
    if args.command is None:
        print(f"gemma-keras: give a command: {', '.join(COMMANDS)} (see --help)", file=sys.stderr)
        return 2
    if args.backend:
        if "keras" in sys.modules:
            print("gemma-keras: --backend must be set before Keras is imported", file=sys.stderr)
            return 2
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        COMMANDS[args.command](args)
    except UsageError as error:
        print(f"gemma-keras {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # one line for users, the traceback with --debug
        if args.debug:
            raise
        message = " ".join(str(error).split())
        print(f"gemma-keras {args.command}: {type(error).__name__}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
