"""The `grpo` section of a fine-tuning config (`train.grpo` reads it); kept apart so that
loading a config does not import the training code."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from lmforge.config import Section


class RewardSpec(Section):
    """One reward: a built-in's name or `module:function` / `file.py:function` (`train.rewards`)."""

    function: str
    weight: float = 1.0
    options: dict[str, Any] = {}  # keyword arguments for every call

    @model_validator(mode="before")
    @classmethod
    def _name_only(cls, value: Any) -> Any:
        return {"function": value} if isinstance(value, str) else value


class EnvironmentSettings(Section):
    """Multi-turn tool use (`train.grpo_env`): the function that runs the model's tool calls."""

    function: str = "calculator"  # a built-in environment, or module:function / file.py:function
    tools: list[str] = ["calculator"]  # the tool names a call may use (others stay text)
    max_turns: int = 3  # model turns per episode

    @model_validator(mode="after")
    def _check(self) -> "EnvironmentSettings":
        if self.max_turns < 1 or not self.tools:
            raise ValueError("environment needs max_turns >= 1 and at least one tool name")
        return self


class GrpoSettings(Section):
    group_size: int = 8  # G: completions sampled per prompt (train.batch_size prompts per step)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    epsilon: float = 0.2  # PPO clip: the ratio is kept in [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # DAPO's clip-higher; None: epsilon
    beta: float = 0.0  # weight of the k3 KL estimate to the reference (0: no reference forward)
    num_iterations: int = 1  # optimizer steps on each batch of rollouts (mu); >1 makes the clip bite
    loss: Literal["token_mean", "sequence_mean", "dr_grpo"] = "token_mean"
    scale_rewards: bool = True  # advantages (r - mean) / (std + eps); false: r - mean (Dr. GRPO)
    rollout: Literal["auto", "merged", "unmerged"] = "auto"  # LoRA: how the engine decodes the policy (auto: merged on CPU)
    eval_prompts: int = 32  # validation prompts decoded greedily at each evaluation
    rewards: list[RewardSpec] = [RewardSpec(function="exact_answer")]
    environment: EnvironmentSettings | None = None  # multi-turn tool use; None: one completion per sample

    @model_validator(mode="after")
    def _check(self) -> "GrpoSettings":
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages compare the completions of one prompt)")
        if self.max_new_tokens < 1 or self.num_iterations < 1:
            raise ValueError("max_new_tokens and num_iterations must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: a group of greedy completions is all alike")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0) or self.beta < 0:
            raise ValueError("epsilon, epsilon_high and beta must be >= 0")
        return self
