"""``vlmamba-client``: ask a running vlmamba-serve server a question from the terminal."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from vlmamba_client._base import DEFAULT_URL
from vlmamba_client.client import Client
from vlmamba_client.errors import APIConnectionError, APIError, AuthenticationError
from vlmamba_client.types import Usage

EXAMPLES = """\
examples:
  vlmamba-client chat --image cat.png "What is in this picture?"
  vlmamba-client chat --image a.png --image https://example.com/b.jpg "What differs?"
  vlmamba-client chat --temperature 0 --max-tokens 50 "Say hello."
  vlmamba-client health
  vlmamba-client models

The server is started with `vlmamba serve` (see its --help). Set VLMAMBA_URL and
VLMAMBA_API_KEY once instead of passing --url and --api-key every time."""


def _common() -> argparse.ArgumentParser:
    """Connection flags, accepted by every command."""
    p = argparse.ArgumentParser(add_help=False)
    # None = let Client read $VLMAMBA_URL / $VLMAMBA_API_KEY, so the help shows the real fallback.
    p.add_argument("--url", default=None, help=f"server address (default: $VLMAMBA_URL or {DEFAULT_URL})")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="API key, if the server was started with --api-key (default: $VLMAMBA_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long to wait for the server (default: 600)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmamba-client", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Talk to a vlmamba-serve server: ask questions about images, check that it is up.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_common()]
    chat = sub.add_parser("chat", parents=common, help="ask a question (about images), answer streamed",
                          description="Ask one question, optionally about images; the answer is printed "
                                      "as it is generated.")
    chat.add_argument("question", help="the question or instruction (quote it)")
    chat.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                      help="an image file or an http(s) URL; repeat for several images")
    chat.add_argument("--max-tokens", type=int, default=None, metavar="N",
                      help="longest answer in tokens (default: server's)")
    chat.add_argument("--temperature", type=float, default=None, metavar="T",
                      help="0 = always the most likely answer; higher = more varied (default: server's, 1.0)")
    chat.add_argument("--system", default=None, metavar="TEXT", help="a system prompt to put before the question")
    chat.add_argument("--no-stream", action="store_true", help="print the answer only once it is complete")
    chat.add_argument("--usage", action="store_true", help="print token counts to stderr afterwards")
    sub.add_parser("health", parents=common, help="check that the server is up and see its load",
                   description="Print the server's /health as JSON; exit code 1 if it is not ready.")
    sub.add_parser("models", parents=common, help="list the model(s) the server serves",
                   description="Print the id of each served model, one a line.")
    return parser


def _print_usage(usage: Usage | None, err: TextIO) -> None:
    if usage is not None:
        print(f"tokens: prompt {usage.prompt_tokens} ({usage.cached_tokens} cached), "
              f"completion {usage.completion_tokens}", file=err)


def _chat(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
    params = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature))
              if v is not None}
    kw = dict(prompt=args.question, images=args.image or None, system=args.system, **params)
    if args.no_stream:
        response = client.chat(**kw)
        print(response.text, file=out)
        usage = response.usage
    else:
        with client.chat(stream=True, **kw) as stream:
            for chunk in stream:
                out.write(chunk.text)
                out.flush()  # show each piece as soon as it arrives
            print(file=out)
            usage = stream.usage
    if args.usage:
        _print_usage(usage, err)


def _hint(exc: APIError) -> str:
    if isinstance(exc, APIConnectionError):
        return " (is the server running? start it with `vlmamba serve`, or pass --url)"
    if isinstance(exc, AuthenticationError):
        return " (pass --api-key or set VLMAMBA_API_KEY)"
    return ""


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 130 interrupted)."""
    out, err = out or sys.stdout, err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        with Client(args.url, args.api_key, timeout=args.timeout) as client:
            if args.command == "chat":
                _chat(client, args, out, err)
            elif args.command == "health":
                print(json.dumps(client.health().model_dump()), file=out)
            else:
                for model in client.models():
                    print(model.id, file=out)
    except APIError as e:
        print(f"vlmamba-client: error: {e}{_hint(e)}", file=err)
        return 1
    except (OSError, ValueError) as e:  # unreadable or unrecognised image files
        print(f"vlmamba-client: error: {e}", file=err)
        return 1
    except KeyboardInterrupt:
        print(file=err)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
