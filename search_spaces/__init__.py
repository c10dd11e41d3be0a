"""Named Optuna search spaces and the reference study's presets. No Ray, no torch."""

from search_spaces.presets import Recipe, default_optimizer, fft_recipe, lora_recipe
from search_spaces.spaces import SPACES, Space, get_space, preset_point

__all__ = ["Recipe", "SPACES", "Space", "default_optimizer", "fft_recipe", "get_space",
           "lora_recipe", "preset_point"]
