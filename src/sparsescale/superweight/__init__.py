"""Super weights (Yu et al. 2024) in any Hugging Face decoder and in our Q-Sparse / BitNet models.

Modules (imports run one way: cli -> summary, quantize, ablate -> detect -> probes)
- `detect`: detection from one prompt, the spike statistic, known published coordinates (its function
  `detect` is not re-exported: the name is the module's).
- `ablate`: zero / scale / restore the super activation / prune other large weights, restored on exit.
- `quantize`: plain vs super-outlier-aware round-to-nearest by blocks; W8A8 with super activations kept.
- `probes`: perplexity, last-word accuracy, stopword probabilities, top next tokens.
- `summary`: one row per analysed model; `report`: figures and tables (imported as a module: it loads
  matplotlib, which the detection jobs and the training loop do not need).
- `cli`: `sparsescale superweight detect|ablate|quantize|summarize|report`.
"""

import importlib

from sparsescale.superweight.ablate import (
    is_ternary, largest_other_weights, pruned_others, restored_activation, scale_target, scaled, single_weight_effects,
    zeroed,
)
from sparsescale.superweight.detect import (
    ABS_THRESHOLD, DEFAULT_MODULE, DEFAULT_THRESHOLD, KNOWN_PATH, KNOWN_STATUSES, OFFICIAL_PROMPT, PERSIST, RULES,
    Detection, SuperWeight, compare_known, edited, effective_input, effective_weight, find_super_weights, is_echo,
    known_entry, known_table, layer_ratios, layer_rule, load_detection, siblings, spike_profile, spike_stats,
    super_positions,
)
from sparsescale.superweight.quantize import fake_quant_activations, quantize_tensor, quantized, sweep

# cli and summary load pandas and scipy (~2 s): imported on first use, so that the training loop, which imports
# `detect` for its spike statistic, does not pay for them.
_LAZY = {"cli_superweight": "cli", "read_summary": "summary", "summarize": "summary", "summary_row": "summary"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"sparsescale.superweight.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ABS_THRESHOLD", "DEFAULT_MODULE", "DEFAULT_THRESHOLD", "KNOWN_PATH", "KNOWN_STATUSES", "OFFICIAL_PROMPT",
    "PERSIST", "RULES", "cli_superweight", "compare_known", "Detection", "edited", "effective_input",
    "effective_weight", "fake_quant_activations", "is_ternary", "scale_target", "find_super_weights", "is_echo",
    "known_entry", "known_table", "largest_other_weights", "layer_ratios", "layer_rule", "load_detection",
    "pruned_others", "quantize_tensor", "quantized",
    "read_summary", "restored_activation", "scaled", "siblings", "single_weight_effects", "spike_profile",
    "spike_stats", "summarize", "summary_row", "super_positions", "SuperWeight", "sweep", "zeroed",
]
