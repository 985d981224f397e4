"""Stage 4, evaluation: features, kNN and linear-probe accuracy, the accuracy matrix and its
continual-learning metrics, plots."""
