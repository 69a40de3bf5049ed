"""Reporting: results.json, leaderboard tables, plots, W&B and TensorBoard."""
