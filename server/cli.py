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
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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

    device = args.device or _best_device()
    model, proc = load_vlmamba(args.checkpoint, device=device, dtype=_torch_dtype(args.dtype, device),
                               backend=args.backend)
    images = [Image.open(p) for p in args.image]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    it = stream_generate(model, proc, messages=[{"role": "user", "content": content}], images=images, params=params)
    while True:
        try:
            sys.stdout.write(next(it))
            sys.stdout.flush()
        except StopIteration as done:
            sys.stdout.write("\n")
            print(f"[{len(done.value.token_ids)} tokens, finish_reason={done.value.finish_reason}]", file=sys.stderr)
            return 0


def cmd_serve(args) -> int:
    print("The HTTP server is not part of this release yet. Meanwhile, answer one question with:\n"
          "  vlmamba generate --checkpoint DIR --image IMAGE.png --prompt 'Describe the image.'\n"
          "and build a checkpoint with `vlmamba assemble` (see docs/checkpoint-format.md).", file=sys.stderr)
    return 2


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
    g.add_argument("--checkpoint", required=True, help="VL-Mamba checkpoint directory")
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

    s = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    s.set_defaults(func=cmd_serve)

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
