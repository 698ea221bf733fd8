"""Critical weight analysis: scores, selection, perturbation, evaluation, statistics."""
