"""Views of one network's weights for the weight-space learners: graph (jraph), tokens, statistics, canonical order."""
