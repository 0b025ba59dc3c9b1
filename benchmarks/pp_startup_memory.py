"""Peak resident memory per rank while a pipeline starts: building the whole model and then
dropping the other stages (as `train.parallel pp` did) against building only the process's
stages (`pipeline_parallel.build_stage_model`, what `lmforge train` does now).

Each way runs under torchrun (2 gloo processes, one pipeline of 2 stages): a rank joins the
process group, reads its resident set (`before`: the interpreter, torch, the process group),
makes the model one way, sets up its `Pipeline` (stages kept, schedule made), and reports its
peak resident set (ru_maxrss) and the bytes of the parameters it keeps. Both ways give the
same weights (tests/train/test_pipeline_parallel.py checks it).

    python benchmarks/pp_startup_memory.py                  # llama 12 x 768, vocabulary 32000 (~110M)
    python benchmarks/pp_startup_memory.py --layers 4 --d-model 256 --heads 8 --vocab 2048
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common import rank_memory_parser, rank_memory_table, rss_bytes, write_rank_memory

WAYS = {"whole": 2, "stage": 2}  # each on 2 processes


def worker(way: str, model: dict, out: Path) -> None:
    import torch

    from lmforge.config import ModelConfig, TrainConfig
    from lmforge.model import Transformer
    from lmforge.train import distributed, pipeline_parallel

    tc = TrainConfig(batch_size=4, parallel="pp", device="cpu")
    ctx, device = distributed.setup(tc.parallel, tc.batch_size, tc.device)
    ctx = pipeline_parallel.pipeline_context(ctx, tc)
    before = rss_bytes()
    cfg = ModelConfig(**model)
    torch.manual_seed(0)
    if way == "whole":
        built = Transformer(cfg).to(device)
    else:
        built = pipeline_parallel.build_stage_model(cfg, tc, ctx, device)
    pipeline_parallel.Pipeline(built, tc, ctx, device)
    write_rank_memory(out, way, ctx.rank, before, sum(p.numel() * p.element_size() for p in built.parameters()))
    distributed.teardown(ctx)


def main() -> None:
    args = rank_memory_parser(__doc__, layers=12, d_model=768, heads=12, vocab=32000).parse_args()
    if args.worker:
        way, model, out = args.worker
        worker(way, json.loads(model), Path(out))
        return
    model = {"family": "llama", "n_layer": args.layers, "d_model": args.d_model, "n_head": args.heads,
             "context": 256, "vocab_size": args.vocab}
    from lmforge.config import ModelConfig
    from lmforge.train.estimate import count_parameters

    params = count_parameters(ModelConfig(**model), args.vocab).total
    rank_memory_table(__file__, f"peak resident memory per rank at pipeline start-up, 2 processes (gloo), llama "
                      f"{args.layers} x {args.d_model}, vocabulary {args.vocab}: {params / 1e6:.1f}M parameters "
                      f"({4 * params / 2**20:.0f} MiB fp32)",
                      WAYS, json.dumps(model), Path(tempfile.mkdtemp(prefix="lmforge-pp-startup-")))


if __name__ == "__main__":
    main()
