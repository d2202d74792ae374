"""Server settings: one dataclass, filled in one place from CLI flags and ``VLMAMBA_*`` variables.

Precedence: command-line flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ServerSettings:
    checkpoint: str | None = _opt(None, "VL-Mamba checkpoint or Cobra run directory (docs/cobra.md); default: "
                                          "the bundled demo model")
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)")
    port: int = _opt(8000, "port to listen on")
    device: str = _opt("auto", "cpu, cuda, cuda:1 ... (auto: cuda if available)")
    dtype: str = _opt("auto", "weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    backend: str = _opt("auto", "kernel backend: auto, cuda (mamba-ssm), triton, ref")
    served_model_name: str | None = _opt(None, "model name in the API (default: the checkpoint folder's name)")
    max_num_seqs: int = _opt(16, "state slots: sequences decoded together")
    max_prefill_seqs: int = _opt(8, "new sequences prefilled together per engine step")
    max_queue: int = _opt(256, "requests allowed to wait for a slot; beyond that: 429 with Retry-After")
    max_model_len: int = _opt(4096, "longest prompt + completion in tokens")
    max_images_per_request: int = _opt(8, "images allowed in one request")
    max_messages: int = _opt(256, "messages allowed in one request")
    max_text_chars: int = _opt(200_000, "characters of text allowed in one request, all messages together")
    max_body_bytes: int = _opt(32 * 2**20, "largest request body in bytes (413 beyond)")
    state_cache_gb: float = _opt(1.0, "memory for cached session states, GiB (on the model's device)")
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' (comma-separated for several keys)")
    protect_health: bool = _opt(False, "also require the API key on /health and /metrics")
    allow_private_image_urls: bool = _opt(False, "allow image URLs that resolve to loopback/private addresses")
    image_fetch_timeout: float = _opt(10.0, "seconds allowed to fetch one image URL")
    max_image_bytes: int = _opt(20 * 2**20, "largest image download or data URL in bytes")
    max_image_pixels: int = _opt(40_000_000, "largest image in pixels (checked before decoding)")
    image_domains: str | None = _opt(None, "comma-separated allowlist of image URL domains")
    max_decoding_pixels: int = _opt(120_000_000, "pixels decoded at once, all requests together (images wait "
                                                  "their turn beyond; at least max_image_pixels)")
    default_max_tokens: int = _opt(512, "completion length when the request sets none")
    grace_period: float = _opt(30.0, "seconds running streams may finish after SIGTERM")
    no_webui: bool = _opt(False, "do not serve the chat page at /")
    random_weights: bool = _opt(False, "ignore the checkpoint's weights and initialise randomly from its "
                                       "config.json (benchmarks at a real model's shape without its weights)")
    state_dtype: str = _opt("float32", "storage of the recurrent SSM states: float32 (exact) or bfloat16 (half the "
                                       "memory and decode traffic per sequence; the math stays fp32)")
    no_cuda_graphs: bool = _opt(False, "run decode steps, prefills and image encoding eagerly on GPU instead of "
                                       "replaying CUDA graphs")
    prefill_graph_tokens: int = _opt(2048, "prefill batches of up to this many tokens (padded to a graph's "
                                           "batch x length bucket) replay CUDA graphs; 0: always eager")
    no_engine_process: bool = _opt(False, "run the engine in a thread of the HTTP server's process instead of a "
                                          "process of its own (simpler to debug; slower under many streams, "
                                          "where HTTP work and the engine share one interpreter lock)")

    @property
    def api_keys(self) -> list[str]:
        return [k.strip() for k in (self.api_key or "").split(",") if k.strip()]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; help texts name the matching VLMAMBA_* variable."""
    for f in dataclasses.fields(ServerSettings):
        env = "VLMAMBA_" + f.name.upper()
        if f.type == "bool" or isinstance(f.default, bool):
            parser.add_argument(_flag(f.name), action="store_true", default=None, help=f"{f.metadata['help']} [{env}]")
        else:
            parser.add_argument(_flag(f.name), default=None, metavar=f.name.upper(),
                                help=f"{f.metadata['help']} (default: {f.default}) [{env}]")


def _convert(f: dataclasses.Field, raw):
    kind = type(f.default) if f.default is not None else str
    if kind is bool:
        return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes", "on")
    return kind(raw)


def from_args(args: argparse.Namespace | None = None, environ: dict | None = None) -> ServerSettings:
    environ = os.environ if environ is None else environ
    values = {}
    for f in dataclasses.fields(ServerSettings):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = environ.get("VLMAMBA_" + f.name.upper())
        if raw is not None:
            values[f.name] = _convert(f, raw)
    return ServerSettings(**values)
