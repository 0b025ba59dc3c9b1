"""Peak resident memory per rank while `generate/serve --tp` load a model directory: one process
loading it whole (--tp 1), 2 processes that each load it whole and then keep their part (what
--tp did before `serve.shard_load`), and 2 processes that each read only their part.

A random llama model directory (fp32 safetensors) is written once to a temporary directory. Each
way runs under torchrun (gloo): a rank joins the process group, reads its resident set (`before`:
the interpreter, torch, the process group), loads, and reports its peak resident set (ru_maxrss)
and the bytes of the parameters it keeps. The ways give the same logits
(tests/serve/test_tensor_parallel_generate.py checks it).

    python benchmarks/tp_load_memory.py                      # llama 12 x 1024, vocabulary 32000 (~200M)
    python benchmarks/tp_load_memory.py --layers 2 --d-model 256 --vocab 2048
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import rank_memory_parser, rank_memory_table, rss_bytes, write_rank_memory

WAYS = {"tp1-whole": 1, "tp2-whole-then-cut": 2, "tp2-shards": 2}


def worker(way: str, model_dir: str, out: Path) -> None:
    import torch.distributed as dist

    import lmforge
    from lmforge.serve import shard_load, tensor_parallel

    device = tensor_parallel.join(WAYS[way])
    before = rss_bytes()
    if way == "tp2-shards":
        model = shard_load.load_shard(model_dir, device).model
    else:
        model = lmforge.load(model_dir).model
        if way == "tp2-whole-then-cut":
            model = shard_load.split(model, device)
    kept = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())
    write_rank_memory(out, way, dist.get_rank(), before, kept)
    dist.destroy_process_group()


def make_model_dir(model: dict, out: Path) -> Path:
    import torch

    from lmforge.config import ModelConfig
    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.model import Transformer
    from lmforge.model_dir import save_model_dir

    tokenizer = train_tokenizer(["The queen of hearts, she made some tarts.", "你好, world 世界"] * 50, vocab_size=300)
    torch.manual_seed(0)
    return save_model_dir(Transformer(ModelConfig(**model)), tokenizer, out / "model")


def main() -> None:
    ap = rank_memory_parser(__doc__, layers=12, d_model=1024, heads=16, vocab=32000)
    ap.add_argument("--kv-heads", type=int, default=8)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker[:2], Path(args.worker[2]))
        return
    model = {"family": "llama", "n_layer": args.layers, "d_model": args.d_model, "n_head": args.heads,
             "n_kv_head": args.kv_heads, "context": 256, "vocab_size": args.vocab}
    out = Path(tempfile.mkdtemp(prefix="lmforge-tp-load-"))
    folder = make_model_dir(model, out)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    rank_memory_table(__file__, f"peak resident memory per rank loading a model for --tp, llama {args.layers} x "
                      f"{args.d_model} ({args.heads} heads, {args.kv_heads} key/value), vocabulary {args.vocab}: "
                      f"weights {size / 2**20:.0f} MiB fp32", WAYS, str(folder), out)


if __name__ == "__main__":
    main()
