"""Group relative policy optimization (GRPO; Shao et al., 2024) with verifiable rewards.

    {"prompt": "Tom has 3 apples and buys 4 more. How many apples?", "answer": 7}
    {"messages": [{"role": "user", "content": "小明有3个苹果，又买了4个。他有几个苹果？"}], "answer": 7}

Each step takes train.batch_size prompts and samples grpo.group_size completions of each with
the continuous-batching engine (`infer.engine`) on the policy's current weights; the rewards
(`train.rewards`: built-ins or the recipe's own functions, weighted) score them; each
completion's advantage is its reward against its group's:

    A = (r - mean(group)) / (std(group) + 1e-4)      (grpo.scale_rewards false: A = r - mean, Dr. GRPO)

with the sample standard deviation (n - 1), as TRL computes it. The loss of a completion token
is PPO's clipped objective, plus the k3 estimate of the KL divergence to the reference when
grpo.beta > 0:

    ratio = exp(logp - logp_old)
    l = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * (exp(ref - logp) - (ref - logp) - 1)

and the tokens' losses are aggregated as grpo.loss says:

- `token_mean` (the default; DAPO, Yu et al., 2025): the mean over every completion token of
  the batch, so a long completion weighs by its length and no sequence-length bias is added;
- `sequence_mean` (the original GRPO): the mean over each completion's tokens, then over completions;
- `dr_grpo` (Liu et al., 2025): the sum over tokens divided by (completions x max_new_tokens).

logp_old is the policy that sampled: with grpo.num_iterations 1 (one update per batch of
rollouts) the ratio is exactly 1 and the loss's gradient is the policy gradient; with more,
the rollouts are reused for num_iterations optimizer steps and the clip bounds how far they
move the policy. Log-probabilities are of the sampling distribution (logits / temperature).

The reference is the starting model: for LoRA and QLoRA the same model with its adapters
switched off for that forward (no second model); for full fine-tuning one frozen copy, kept
only when beta > 0.

Rollouts decode the policy in place: a full fine-tune's engine reads the training weights
themselves (the native decoder points at the tensors the optimizer updates). A LoRA policy is
decoded `unmerged` (the engine runs the adapter layers through PyTorch) or `merged` (one plain
copy of the model, allocated once, whose linears are refreshed with W + BA before each
rollout, so the native decoder runs it). `auto` takes merged where the native decoder runs
the model and the base is not quantized, else unmerged: at GRPO's 64 rollouts on the
quickstart-sized model merged was 2x faster on a lightly loaded CPU, and slower only on one
oversubscribed many times over, where the native decoder's threads wait on each other
(benchmarks/RESULTS.md).

Completions are sampled with seeds derived from train.seed, the rollout number, the prompt's
place and the sample's, so a resumed run samples what an uninterrupted one would. With
num_iterations > 1 the current rollouts are also kept in the run directory (rollout.pt), for a
run resumed between two of their updates. Each evaluation decodes up to grpo.eval_prompts
validation prompts greedily and reports their mean reward (val_loss is its negative).

With grpo.environment a sample is a multi-turn tool-use episode (`train.grpo_env`): the model's
tool calls are run by the environment, their results are context, and only the model's own
tokens are trained on.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.data.sft import IGNORE, EpochBatches, Row, check_messages, collate, read_jsonl, split_validation
from lmforge.errors import LmforgeError
from lmforge.train.distributed import BatchShare
from lmforge.train.rewards import Reward, build_rewards

ADVANTAGE_EPS = 1e-4


# ----------------------------------------------------------------------------- the arithmetic

def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """rewards (prompts, G) -> advantages (prompts, G): each reward against its own group."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    return centered / (rewards.std(dim=1, keepdim=True) + eps) if scale else centered


def token_logps(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """log p(target token) under softmax(logits / temperature): (rows, T), 0 where the target is IGNORE."""
    logits = model(input_ids).float() / temperature
    picked = torch.gather(logits, 2, targets.clamp(min=0)[..., None])[..., 0]
    return (picked - logits.logsumexp(-1)) * (targets != IGNORE)


@dataclass
class LossParts:
    loss: torch.Tensor
    kl: float  # token mean of the k3 estimate (0 without a reference)
    clip_fraction: float  # of the tokens, those whose clipped term was the one taken


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                epsilon: float, epsilon_high: float | None = None, beta: float = 0.0,
                ref_logp: torch.Tensor | None = None, aggregation: str = "token_mean",
                max_new_tokens: int | None = None) -> LossParts:
    """The clipped policy-gradient loss over completion tokens (see the module docstring).
    logp, old_logp, ref_logp, mask: (rows, T); advantages: (rows,)."""
    mask = mask.to(logp.dtype)
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None].to(logp.dtype)
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + high) * a
    per_token = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
    tokens = mask.sum().clamp(min=1)
    if aggregation == "token_mean":
        loss = (per_token * mask).sum() / tokens
    elif aggregation == "sequence_mean":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif aggregation == "dr_grpo":
        if not max_new_tokens:
            raise ValueError("dr_grpo aggregation needs max_new_tokens")
        loss = (per_token * mask).sum() / (logp.shape[0] * max_new_tokens)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    with torch.no_grad():
        took_clip = (clipped < unclipped).to(mask.dtype)  # min() chose the clipped term
        stats = (float((kl * mask).sum() / tokens), float((took_clip * mask).sum() / tokens))
    return LossParts(loss, *stats)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The model computes its base (every LoRA update scaled by 0) inside the block."""
    from lmforge.model.lora import lora_layers

    layers = list(lora_layers(model).values())
    scalings = [layer.scaling for layer in layers]
    for layer in layers:
        layer.scaling = 0.0
    try:
        yield model
    finally:
        for layer, s in zip(layers, scalings):
            layer.scaling = s


# ----------------------------------------------------------------------------- prompts

@dataclass
class PromptItem:
    prompt: str | list[dict[str, str]]  # as the data gives it: what rewards see
    ids: list[int]
    fields: dict[str, Any]  # the line's other keys (answer, tests, schema...)
    line: int


def load_prompts(path: str, tokenizer, context: int, on_long: str, log) -> list[PromptItem]:
    """Prompts from JSONL: `prompt` (text, or a chat as a list of messages) or `messages`, each
    with any other fields the rewards read. A chat is rendered with the model's chat template
    up to the assistant's turn."""
    out, too_long = [], []
    for line, obj in read_jsonl(path):
        raw = obj.get("messages", obj.get("prompt"))
        if isinstance(raw, str) and "messages" not in obj:
            if not raw:
                raise LmforgeError(f"{path} line {line}: the prompt is empty")
            ids = tokenizer.encode(raw)
        elif isinstance(raw, list):
            messages = check_messages(raw, line, Path(path))
            if messages[-1]["role"] == "assistant":
                raise LmforgeError(f"{path} line {line}: the chat ends with an assistant turn; it should end where "
                                   "the completion begins")
            ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        else:
            raise LmforgeError(f"{path} line {line}: expected 'prompt' (text) or 'messages' (a chat: a list of "
                               f"role/content messages); found keys {sorted(obj)}")
        if len(ids) >= context:
            too_long.append(line)
            continue
        fields = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
        out.append(PromptItem(raw, ids, fields, line))
    if too_long:
        what = f"{len(too_long)} prompt(s) fill the model's context of {context} tokens (first at line {too_long[0]})"
        if on_long == "error" or not out:
            raise LmforgeError(f"{path}: {what}; shorten them")
        log(f"grpo: {what}: skipped")
    return out


# ----------------------------------------------------------------------------- rollouts

class Rollouts:
    """Samples completions of the policy with `infer.engine.Engine`, decoding its current weights
    (see the module docstring for LoRA's merged and unmerged modes)."""

    def __init__(self, model: nn.Module, tokenizer, mode: str, max_batch: int, stop_ids: list[int], log):
        from lmforge.model.lora import is_quantized, lora_layers

        self.model, self.tokenizer, self.max_batch, self.stop_ids = model, tokenizer, max_batch, stop_ids
        self.lora = lora_layers(model)
        if not self.lora:
            mode = "policy"
        elif mode == "auto":
            quantized = any(is_quantized(layer.base) for layer in self.lora.values())
            mode = "merged" if not quantized and self._native_covers() else "unmerged"
        elif mode == "merged" and any(is_quantized(layer.base) for layer in self.lora.values()):
            raise LmforgeError("grpo.rollout merged would hold a full-precision copy of a QLoRA base; use unmerged")
        self.mode = mode
        self.decode_model: nn.Module | None = None
        self.engine = None
        self._pointers: tuple[int, ...] = ()
        native = mode != "unmerged" and self._native_covers()
        log(f"grpo: rollouts decode {'the policy in place' if mode == 'policy' else 'the adapter ' + mode}, "
            f"{'with the native decoder' if native else 'through PyTorch'}")

    def _native_covers(self) -> bool:
        """Whether the native decoder runs what the engine decodes (for LoRA: the merged plain model)."""
        from lmforge.infer.native_decode import why_not

        w = self.model.tok_emb.weight
        if self.lora:
            return w.device.type == "cpu" and w.dtype == torch.float32 and _native_available()
        was = self.model.training
        self.model.eval()
        try:
            return why_not(self.model) is None
        finally:
            self.model.train(was)

    def _decoded(self) -> nn.Module:
        """The module the engine decodes, refreshed to the policy's current weights."""
        if self.mode != "merged":
            return self.model
        from lmforge.model.lora import merge_lora

        if self.decode_model is None:
            self.decode_model = merge_lora(copy.deepcopy(self.model)).requires_grad_(False).eval()
        with torch.no_grad():
            for name, layer in self.lora.items():
                target = self.decode_model.get_submodule(name)
                target.weight.copy_(layer.base.weight)
                target.weight.add_(layer.delta_weight().to(target.weight.dtype))
        return self.decode_model

    def _engine(self):
        from lmforge.infer.engine import Engine

        decoded = self._decoded()
        pointers = tuple(p.data_ptr() for p in decoded.parameters())
        if self.engine is None or pointers != self._pointers:  # the native decoder holds the tensors' addresses
            was = decoded.training
            self.engine = Engine(decoded, self.tokenizer, max_batch=self.max_batch, max_queue=1 << 20)
            decoded.train(was)
            self._pointers = pointers
        return self.engine, decoded

    def generate(self, prompts: list[list[int]], params: list) -> list:
        """One engine Result per (prompt ids, SamplingParams)."""
        from lmforge.infer.engine import Request

        engine, decoded = self._engine()
        requests = [Request(prompt=ids, params=p, stop_token_ids=list(self.stop_ids)) for ids, p in zip(prompts, params)]
        was = decoded.training
        decoded.eval()
        try:
            with engine:
                results = engine.generate(requests)
        finally:
            decoded.train(was)
        for r in results:
            if r.finish_reason == "error":
                raise LmforgeError(f"grpo: a rollout failed in the engine: {r.text or 'error'}")
        return results


def _native_available() -> bool:
    from lmforge import native

    lib = native.kernels()
    return lib is not None and bool(lib.decode_supported())


def rollout_seed(seed: int, rollout: int, prompt: int, sample: int) -> int:
    return (((seed * 1_000_003 + rollout) * 1_000_033 + prompt) * 4099 + sample) % (1 << 62)


# ----------------------------------------------------------------------------- the task

class GrpoTask:
    head = None
    task_type = "CAUSAL_LM"

    def __init__(self, cfg, loaded, device, log, share: BatchShare | None = None):
        if share is not None and share.ctx.active:
            raise LmforgeError("task grpo trains on one process for now: run it without --nproc/torchrun")
        g = cfg.grpo
        self.cfg, self.g, self.log, self.device = cfg, g, log, device
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        context = loaded.config.context
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        self.rewards: list[Reward] = build_rewards(g.rewards)
        self.env = None
        if g.environment is not None:
            from lmforge.train.grpo_env import ToolEnvironment

            self.env = ToolEnvironment(g.environment, self.tokenizer, context)
        prompts = load_prompts(cfg.data.train, self.tokenizer, context, cfg.data.on_long, log)
        if cfg.data.val:
            val = load_prompts(cfg.data.val, self.tokenizer, context, cfg.data.on_long, log)
        else:
            prompts, val = split_validation(prompts, cfg.data.val_fraction, cfg.train.seed)
        self.prompts, self.val_prompts = prompts, val or prompts
        self.batches = EpochBatches(self.prompts, cfg.train.batch_size, cfg.train.seed)
        chat = any(isinstance(p.prompt, list) for p in self.prompts + self.val_prompts)
        stop_ids = []
        if chat:
            from lmforge.data.chat_template import end_of_turn_ids

            stop_ids = end_of_turn_ids(self.tokenizer)
        rows = cfg.train.batch_size * g.group_size
        self.rollouts = Rollouts(self.model, self.tokenizer, g.rollout, min(rows, 256), stop_ids, log)
        self.reference = None
        if g.beta > 0 and not self.rollouts.lora:
            self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        longest = max(len(p.ids) for p in self.prompts)
        turns = g.environment.max_turns if g.environment is not None else 1
        self.tokens_per_batch = math.ceil(rows / cfg.train.grad_accum) * min(longest + turns * g.max_new_tokens,
                                                                           context)
        self.rollout_file = Path(cfg.run.dir) / "rollout.pt"
        self._current: tuple[int, list[dict[str, torch.Tensor]]] | None = None
        self._window: dict[str, list[float]] = {}
        self._step_start: float | None = None
        self._step_seconds = 0.0
        log(f"grpo: {len(self.prompts)} training prompts, {len(self.val_prompts)} for evaluation; "
            f"{g.group_size} completions of {cfg.train.batch_size} prompts per rollout; "
            f"rewards: {', '.join(f'{r.name} x{r.weight:g}' for r in self.rewards)}")

    # -- the loop's interface --------------------------------------------------------------------
    def batch(self, index: int) -> dict[str, torch.Tensor]:
        ga = self.cfg.train.grad_accum
        step, micro = divmod(index, ga)
        if micro == 0:
            now = time.perf_counter()
            if self._step_start is not None:
                self._step_seconds += now - self._step_start
            self._step_start = now
        rollout = step // self.g.num_iterations
        if self._current is None or self._current[0] != rollout:
            self._current = (rollout, self._restore(rollout) or self._roll(rollout))
        return self._current[1][micro]

    def loss(self, model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        g = self.g
        logp = token_logps(model, b["input_ids"], b["targets"], g.temperature)
        old = b["old_logps"] if "old_logps" in b else logp.detach()
        parts = policy_loss(logp, old, b["advantages"], b["targets"] != IGNORE, epsilon=g.epsilon,
                            epsilon_high=g.epsilon_high, beta=g.beta, ref_logp=b.get("ref_logps"),
                            aggregation=g.loss, max_new_tokens=g.max_new_tokens)
        self._note(kl=parts.kl, clip_fraction=parts.clip_fraction)
        return parts.loss

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from lmforge.infer.sampling import SamplingParams

        items = self.val_prompts[:self.g.eval_prompts]
        params = [SamplingParams(max_new_tokens=self.g.max_new_tokens) for _ in items]
        if self.env is not None:
            episodes = self._episodes(items, params)
            scores = self._score(items, [e.completion for e in episodes], [e.transcript for e in episodes])
        else:
            results = self.rollouts.generate([p.ids for p in items], params)
            scores = self._score(items, [r.text for r in results])
        total = sum(r.weight * scores[r.name] for r in self.rewards)
        out = {"val_loss": -float(total.mean()), "val_reward": float(total.mean())}
        out.update({f"val_reward/{name}": float(s.mean()) for name, s in scores.items()})
        return out

    def head_record(self) -> dict:
        return {}

    def log_record(self) -> dict[str, float]:
        """The rollout and loss statistics since the last record (means per step)."""
        if self._step_start is not None:
            self._step_seconds += time.perf_counter() - self._step_start
            self._step_start = None
        w, self._window = self._window, {}
        out = {k: sum(v) / len(v) for k, v in w.items() if v and k != "rollout_s"}
        steps = max(len(w.get("kl", [])) / self.cfg.train.grad_accum, 1)
        rollout_s = sum(w.get("rollout_s", []))
        out["rollout_s"] = rollout_s / steps
        out["update_s"] = max(self._step_seconds - rollout_s, 0.0) / steps
        out["rollout_share"] = rollout_s / self._step_seconds if self._step_seconds > 0 else 0.0
        self._step_seconds = 0.0
        return out

    # -- rollouts --------------------------------------------------------------------------------
    def _note(self, **values: float) -> None:
        for k, v in values.items():
            self._window.setdefault(k, []).append(float(v))

    def _score(self, items: list[PromptItem], texts: list[str],
               transcripts: list[list[dict]] | None = None) -> dict[str, torch.Tensor]:
        fields = [p.fields for p in items] if transcripts is None else \
            [{**p.fields, "transcript": t} for p, t in zip(items, transcripts)]
        return {r.name: torch.tensor([r(p.prompt, t, f) for p, t, f in zip(items, texts, fields)],
                                     dtype=torch.float32)
                for r in self.rewards}

    def _episodes(self, items: list[PromptItem], params: list) -> list:
        return self.env.run(self.rollouts.generate, [p.prompt for p in items], [p.ids for p in items],
                            [p.fields for p in items], params)

    def _roll(self, rollout: int) -> list[dict[str, torch.Tensor]]:
        """Sample, score and batch rollout number `rollout`: its grad_accum micro-batches."""
        from lmforge.infer.sampling import SamplingParams

        g, tc = self.g, self.cfg.train
        start = time.perf_counter()
        prompts = self.batches.batch(rollout)
        places = self.batches.indices(rollout)
        items = [p for p in prompts for _ in range(g.group_size)]
        params = [SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                 top_k=g.top_k, seed=rollout_seed(tc.seed, rollout, place, j))
                  for place in places for j in range(g.group_size)]
        if self.env is not None:
            episodes = self._episodes(items, params)
            scores = self._score(items, [e.completion for e in episodes], [e.transcript for e in episodes])
            rows = [e.row() for e in episodes]
            lengths = torch.tensor([float(e.model_tokens) for e in episodes])
            self._note(tool_calls=sum(len(m.get("tool_calls", [])) for e in episodes for m in e.transcript)
                       / len(episodes))
        else:
            results = self.rollouts.generate([p.ids for p in items], params)
            scores = self._score(items, [r.text for r in results])
            rows = []
            for item, result in zip(items, results):
                completion = [t.token for t in result.tokens]  # the end-of-text token too: the policy chose it
                ids = item.ids + completion
                rows.append(Row(ids[:-1], [IGNORE] * (len(item.ids) - 1) + completion, [1] * (len(ids) - 1)))
            lengths = torch.tensor([float(len(r.tokens)) for r in results])
        total = sum(r.weight * scores[r.name] for r in self.rewards)
        advantages = group_advantages(total.view(len(prompts), g.group_size), g.scale_rewards).flatten()
        micro = []
        for part in torch.arange(len(rows)).tensor_split(tc.grad_accum):
            chosen = [rows[i] for i in part.tolist()]
            b = collate(chosen, self.pad_id, packed=False)
            b["advantages"] = advantages[part]
            micro.append(b)
        self._extra_logps(micro)
        self._note(reward=float(total.mean()), reward_std=float(total.std()),
                   completion_tokens=float(lengths.mean()),
                   zero_advantage_groups=float((total.view(len(prompts), -1).std(1) == 0).float().mean()))
        for name, s in scores.items():
            self._note(**{f"reward/{name}": float(s.mean()), f"reward/{name}_std": float(s.std())})
        if g.num_iterations > 1:
            self._keep(rollout, micro)
        self._note(rollout_s=time.perf_counter() - start)
        return micro

    @torch.no_grad()
    def _extra_logps(self, micro: list[dict[str, torch.Tensor]]) -> None:
        """The sampling policy's log-probabilities (for num_iterations > 1) and the reference's (beta > 0)."""
        g = self.g
        need_old, need_ref = g.num_iterations > 1, g.beta > 0
        if not (need_old or need_ref):
            return
        was = self.model.training
        self.model.eval()
        try:
            for b in micro:
                x, y = b["input_ids"].to(self.device), b["targets"].to(self.device)
                if need_old:
                    b["old_logps"] = token_logps(self.model, x, y, g.temperature).cpu()
                if need_ref:
                    if self.reference is not None:
                        b["ref_logps"] = token_logps(self.reference, x, y, g.temperature).cpu()
                    else:
                        with adapters_disabled(self.model):
                            b["ref_logps"] = token_logps(self.model, x, y, g.temperature).cpu()
        finally:
            self.model.train(was)

    def _keep(self, rollout: int, micro: list[dict[str, torch.Tensor]]) -> None:
        self.rollout_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.rollout_file.with_name(f".{self.rollout_file.name}.tmp")
        torch.save({"rollout": rollout, "micro": micro, "seed": self.cfg.train.seed}, tmp)
        tmp.replace(self.rollout_file)  # whole or not at all

    def _restore(self, rollout: int) -> list[dict[str, torch.Tensor]] | None:
        """The kept rollouts when a resumed run continues between two of their updates."""
        if self.g.num_iterations == 1 or not self.rollout_file.is_file():
            return None
        try:
            kept = torch.load(self.rollout_file, weights_only=True)
        except Exception:
            return None
        if kept.get("rollout") != rollout or kept.get("seed") != self.cfg.train.seed:
            return None
        self.log(f"grpo: continuing rollout {rollout} from {self.rollout_file}")
        return kept["micro"]
