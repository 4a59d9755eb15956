"""Evaluations of a trained model: `identity` asks it who it is."""
