"""drpo-reasoning-gym: reasoning-gym tasks (``data.task: reasoning_gym:<name>``) and their scorers (reward
``reasoning_gym``) for drpo-lightning, registered through entry points only."""

from drpo_reasoning_gym.reward import ReasoningGymReward
from drpo_reasoning_gym.task import ReasoningGymTask

__all__ = ["ReasoningGymReward", "ReasoningGymTask"]
