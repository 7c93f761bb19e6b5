"""Data: formats, validation, chat templates with assistant-only labels, splits, leakage, batches."""

from appliance.data.batches import Batch, MicroBatchPlan
from appliance.data.dataset import PreparedData, prepare
from appliance.data.load import load_file, recipe_for

__all__ = ["Batch", "MicroBatchPlan", "PreparedData", "load_file", "prepare", "recipe_for"]
