"""Architecture search under a budget: grid enumeration, zero-shot scoring, brief retraining."""

from nemo_minitron.search.cache import CandidateCache
from nemo_minitron.search.space import AXES, Budget, SearchSpace, candidate_name, enumerate_candidates, spread

__all__ = ["AXES", "Budget", "CandidateCache", "SearchSpace", "candidate_name", "enumerate_candidates", "spread"]
