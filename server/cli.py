"""The ``vlmamba`` command: one subcommand per task; heavy imports happen inside each."""

from __future__ import annotations

import argparse
import logging
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _best_device() -> str:
    import os

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda"


def cmd_assemble(args) -> int:
    from model.checkpoint_vlm import assemble

    assemble(args.vision, args.llm, args.out, args.connector, args.scan, args.tokenizer, args.feature_layer, args.seed)
    print(f"wrote a VL-Mamba checkpoint to {args.out} (connector {args.connector}/{args.scan}, freshly initialised)")
    return 0


def cmd_generate(args) -> int:
    from PIL import Image

    from model.checkpoint_vlm import load_vlmamba
    from model.generate import stream_generate
    from model.sampling import SamplingParams

    from model.demo import DEMO_CHECKPOINT
    from model.errors import InvalidRequest

    try:  # the arguments first, so that a bad one is a usage error before the model loads
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
        images = [Image.open(p) for p in args.image]
    except (InvalidRequest, OSError) as err:
        print(f"vlmamba generate: error: {err}", file=sys.stderr)
        return 2
    device = args.device or _best_device()
    model, proc = load_vlmamba(args.checkpoint or DEMO_CHECKPOINT, device=device, dtype=_torch_dtype(args.dtype, device),
                               backend=args.backend)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    it = stream_generate(model, proc, messages=[{"role": "user", "content": content}], images=images, params=params)
    while True:
        try:
            sys.stdout.write(next(it))
            sys.stdout.flush()
        except StopIteration as done:
            sys.stdout.write("\n")
            print(f"[{len(done.value.token_ids)} tokens, finish_reason={done.value.finish_reason}]", file=sys.stderr)
            return 0


def cmd_train(args) -> int:
    import dataclasses

    from model.training.trainer import TrainConfig, train

    device = args.device or _best_device()
    if args.recipe == "demo":
        from model.training.data import ShapesDataset
        from model.training.recipes import DemoRecipe, build_demo

        overrides = {k: v for k, v in (("connector", args.connector), ("scan", args.scan),
                                        ("max_steps", args.max_steps), ("n_images", args.n_images),
                                        ("seed", args.seed)) if v is not None}
        recipe = DemoRecipe(**overrides, **_recipe_settings(DemoRecipe, args.set))
        model, proc = build_demo(recipe)
        dataset = ShapesDataset(proc, "train", recipe.n_images, recipe.seed)
        cfg = TrainConfig(out=args.out, stage="finetune", train_vision=True, max_steps=recipe.max_steps,
                          batch_size=args.batch_size or recipe.batch_size, lr=args.lr or recipe.lr,
                          warmup_steps=recipe.warmup_steps, seed=recipe.seed, device=device,
                          save_every=args.save_every, num_workers=args.num_workers, resume=args.resume,
                          grad_accum=args.grad_accum, bf16=False)  # fp32: a tiny model, and stable
    else:
        from model.checkpoint_vlm import load_vlmamba
        from model.training.data import LlavaDataset

        if not (args.checkpoint and args.data):
            raise SystemExit("vlmamba train: give --recipe demo, or --checkpoint and --data")
        model, proc = load_vlmamba(args.checkpoint)
        dataset = LlavaDataset(args.data, args.images, proc, args.max_len)
        cfg = TrainConfig(out=args.out, stage=args.stage, train_vision=args.train_vision,
                          max_steps=args.max_steps or 1000, batch_size=args.batch_size or 16, lr=args.lr or 1e-3,
                          warmup_steps=args.warmup_steps, seed=args.seed or 0, device=device,
                          save_every=args.save_every, num_workers=args.num_workers, resume=args.resume,
                          grad_accum=args.grad_accum, weight_decay=args.weight_decay, bf16=not args.no_bf16)
    logging.getLogger(__name__).info("training: %s", dataclasses.asdict(cfg))
    losses = train(model, proc, dataset, cfg)
    print(f"trained {len(losses)} steps; last loss {losses[-1]:.4f}; checkpoint in {args.out}" if losses
          else f"nothing left to train; checkpoint in {args.out}")
    return 0


def _recipe_settings(cls, pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs, typed by the recipe dataclass's defaults."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"--set: unknown recipe field {key!r}; known: {', '.join(fields)}")
        out[key] = type(fields[key].default)(value)
    return out


def cmd_eval_shapes(args) -> int:
    import json

    from model.checkpoint_vlm import load_vlmamba
    from model.training.eval_shapes import evaluate_shapes, format_table

    from model.demo import DEMO_CHECKPOINT

    device = args.device or _best_device()
    model, proc = load_vlmamba(args.checkpoint or DEMO_CHECKPOINT, device=device)
    result = evaluate_shapes(model, proc, args.n, args.seed, args.batch_size)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from server.app import create_app, draining_server
    from server.threads import name_os_thread
    from server.settings import from_args

    settings = from_args(args)
    name_os_thread("vlmamba-serve")  # the process's name in ps and top: its event loop runs in this thread
    if not settings.no_engine_process:
        # The model runs in the engine process; here torch only preprocesses images, a few small
        # ops per request, for which a pool of intra-op threads costs more (its idle threads spin)
        # than it saves. Requests still preprocess in parallel, one worker thread each.
        import torch

        torch.set_num_threads(1)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=int(settings.grace_period))
    draining_server(config, settings.grace_period).run()
    return 0


def cmd_shapes_export(argv: list[str]) -> int:
    from model.data.shapes import main

    return main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmamba", description="Serve, run and build VL-Mamba vision-language models.")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING; default INFO)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("assemble", help="build a trainable checkpoint from a local vision tower and a local Mamba LM",
                       description="Combine a local SigLIP or CLIP checkpoint directory and a local Mamba LM "
                                   "(mamba_ssm or transformers layout) into one VL-Mamba checkpoint directory "
                                   "with a freshly initialised connector, ready for training.")
    a.add_argument("--vision", required=True, help="directory of a SigLIP or CLIP checkpoint (transformers format)")
    a.add_argument("--llm", required=True, help="directory of a Mamba-1 LM (mamba_ssm or transformers layout)")
    a.add_argument("--tokenizer", help="tokenizer directory if the LM directory has none (e.g. GPT-NeoX's)")
    a.add_argument("--connector", default="vss_l2", choices=("mlp", "vss_mlp", "vss_l2"), help="connector variant")
    a.add_argument("--scan", default="bsm", choices=("bsm", "csm"), help="2D scan of the VSS connectors")
    a.add_argument("--feature-layer", type=int, default=-2, help="vision hidden-state index to use (-2: penultimate)")
    a.add_argument("--seed", type=int, default=0, help="seed of the connector's initialisation")
    a.add_argument("--out", required=True, help="output checkpoint directory")
    a.set_defaults(func=cmd_assemble)

    g = sub.add_parser("generate", help="answer one prompt about zero or more images",
                       description="Load a checkpoint, ask one question about the given images and stream the answer.")
    g.add_argument("--checkpoint", help="VL-Mamba checkpoint or Cobra run directory (docs/cobra.md); "
                                         "default: the bundled demo model")
    g.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    g.add_argument("--prompt", required=True, help="the question or instruction")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), higher = more random")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string; repeat for several")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--backend", default="auto", choices=("auto", "cuda", "triton", "ref"), help="kernel backend")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train a checkpoint (two stages) or the demo model from scratch",
                       description="Train VL-Mamba. Stage 'pretrain' trains the connector only; 'finetune' the "
                                   "connector and the LM (add --train-vision for the vision tower too). Data is "
                                   "LLaVA-format JSON plus an image folder. --recipe demo trains the bundled "
                                   "Shapes-VQA model from scratch. Run under torchrun for multi-GPU data parallel.")
    t.add_argument("--recipe", choices=("demo",), help="a complete built-in setup (the demo model)")
    t.add_argument("--checkpoint", help="checkpoint directory to start from (e.g. made by `vlmamba assemble`)")
    t.add_argument("--data", help="LLaVA-format JSON file")
    t.add_argument("--images", help="image folder the JSON's image paths are relative to (default: its folder)")
    t.add_argument("--out", required=True, help="output directory (checkpoints go to OUT/checkpoint-STEP)")
    t.add_argument("--stage", default="finetune", choices=("pretrain", "finetune"), help="training stage")
    t.add_argument("--train-vision", action="store_true", help="also train the vision tower")
    t.add_argument("--max-steps", type=int, help="optimizer steps")
    t.add_argument("--batch-size", type=int, help="sequences per micro-batch (per GPU)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, help="peak learning rate (warmup then cosine decay)")
    t.add_argument("--warmup-steps", type=int, default=50, help="linear warmup steps")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    t.add_argument("--max-len", type=int, default=2048, help="truncate conversations to this many tokens")
    t.add_argument("--save-every", type=int, default=0, help="write a resumable checkpoint every N steps")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under --out")
    t.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    t.add_argument("--seed", type=int, help="seed of data order and initialisation")
    t.add_argument("--no-bf16", action="store_true", help="train in float32 on GPU (default: bf16 autocast)")
    t.add_argument("--n-images", type=int, help="demo: distinct training images")
    t.add_argument("--connector", choices=("mlp", "vss_mlp", "vss_l2"), help="demo: connector variant")
    t.add_argument("--scan", choices=("bsm", "csm"), help="demo: 2D scan")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="demo: override a recipe field, e.g. --set d_model=256 (repeatable)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; LOCAL_RANK under torchrun)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval-shapes", help="exact-match accuracy per question type on the Shapes-VQA test split")
    e.add_argument("--checkpoint", help="checkpoint directory (default: the bundled demo model)")
    e.add_argument("--n", type=int, default=500, help="test images (each with all its questions)")
    e.add_argument("--seed", type=int, default=0, help="dataset seed")
    e.add_argument("--batch-size", type=int, default=64, help="questions answered together")
    e.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    e.add_argument("--json", help="also write the result as JSON to this file")
    e.set_defaults(func=cmd_eval_shapes)

    s = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server (default: the bundled demo model)",
                       description="Serve a checkpoint over an OpenAI-compatible API (/v1/chat/completions, "
                                   "/v1/models, /health, /metrics, docs at /docs). Every flag can also be set "
                                   "with the VLMAMBA_* environment variable named in its help.")
    from server.settings import add_arguments

    add_arguments(s)
    s.set_defaults(func=cmd_serve)

    from server.bench import add_bench_parser
    from server.evaluation import add_eval_parser

    add_bench_parser(sub)
    add_eval_parser(sub)

    sub.add_parser("shapes-export", add_help=False, help="write a Shapes-VQA split in LLaVA format (see --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["shapes-export"]:
        return cmd_shapes_export(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
