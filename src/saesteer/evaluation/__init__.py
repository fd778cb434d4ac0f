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
    FeatureScores,
    Selection,
    candidate_table,
    candidates_for,
    concept_candidates,
    concept_token_ids,
    concept_variants,
    select_features,
)
from .concept_level import Evaluation, run_evaluation
from .layout import (
    ASSETS_EVAL,
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
    METHODS,
    PROMPT_TEMPLATE,
    SAE_METHODS,
    EvalParams,
)
from .report import fig_compare, fig_concepts, fig_methods, fig_strength_curves, figures, write_report
from .results import EvalResults, RunProgress, load_results, method_table, pack_results, run_progress, strength_curves, summarize

__all__ = [n for n in dir() if not n.startswith("_")]
