"""The paper's two experiments and their results, one concern per module:

- :mod:`.params` — the concept-level run's parameters (:class:`EvalParams`) and method names;
  :class:`.feature_level.FeatureLevelParams` those of the feature level;
- :mod:`.candidates` — a concept's input- and output-side candidate features and the picks;
- :mod:`.metrics` — metrics of one generation (shared with the steering lab's sweep) and the strength choice;
- :mod:`.layout` — where runs live and the run-folder layout (the only module that knows the files);
- :mod:`.concept_level` — the concept-level runner (row planning, batched decoding with OOM halving, perplexity);
- :mod:`.feature_level` — the feature-level experiment (runner, reader and the paper's statistics);
- :mod:`.results` — reading concept-level runs back, tables, packing;
- :mod:`.report` — figures and the HTML report.

The names below are the package's public API (the CLI, the app and the tests import them from here).
"""

from .candidates import (
    Candidate,
    CandidateParams,
    ConceptCandidates,
    FeatureBank,
    candidate_table,
    candidates_for,
    concept_candidates,
    concept_token_ids,
    concept_variants,
)
from .concept_level import Evaluation, run_evaluation
from .layout import (
    PACKED_UNITS,
    concept_runs,
    default_concepts,
    default_out_dir,
    default_prefixes,
    eval_roots,
    feature_runs,
    list_runs,
    read_list,
    run_kind,
    slug,
)
from .metrics import (
    METRICS,
    best_strength,
    concept_mentions,
    continuation_nll,
    fluency,
    normalise_token,
    ppl_factor,
    repetition,
    split_prefixes,
    success_at_k,
    target_strings,
)
from .params import (
    BASELINES,
    DIFFMEAN_COEFFS,
    GRID_METHODS,
    KNOWN_METHODS,
    KNOWN_SAE_METHODS,
    METHODS,
    PREVIOUS_METHODS,
    PREVIOUS_SAE_METHODS,
    PROTOCOL,
    PROMPT_TEMPLATE,
    SAE_METHODS,
    EvalParams,
)
from .report import concept_headline, fig_compare, fig_concepts, fig_methods, fig_strength_curves, figures, ratio_sentence, write_report
from .results import (
    CANDIDATE_KINDS,
    EvalResults,
    Ratio,
    RunProgress,
    candidate_counts,
    feature_results,
    load_results,
    method_table,
    pack_results,
    paired_ratio,
    run_progress,
    strength_curves,
    summarize,
)

__all__ = [n for n in dir() if not n.startswith("_")]
