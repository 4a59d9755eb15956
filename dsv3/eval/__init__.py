"""Evaluations of a trained model: log-likelihood tasks from local files (`tasks`, scored by `likelihood`),
and `identity`, which asks it who it is."""
