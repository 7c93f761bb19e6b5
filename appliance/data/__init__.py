"""Data: formats and their validation (formats, load), chat templates with assistant-only labels
(template), tokenizing per task (encoders), splits and the leakage check (split), mixing and replay
(mix), the whole preparation (dataset), and batches (batches). Tokenizers, never models."""

from appliance.data.augment import INSTRUCTION as PARAPHRASE_INSTRUCTION
from appliance.data.augment import AugmentReport, paraphrase_file
from appliance.data.batches import Batch, MicroBatchPlan, collate_classification, collate_lm, collate_pairs, collate_unpaired
from appliance.data.dataset import DataReport, PreparedData, data_records, examples_per_epoch, prepare
from appliance.data.encoders import Encoded
from appliance.data.formats import Message
from appliance.data.load import load_file, recipe_for
from appliance.data.mix import MixturePlan
from appliance.data.template import (
    IGNORE_INDEX,
    TemplateMismatch,
    TokenizedExample,
    end_of_turn,
    has_chat_template,
    render,
    require_chat_template,
    tokenize_chat,
)

__all__ = [
    "IGNORE_INDEX",
    "PARAPHRASE_INSTRUCTION",
    "AugmentReport",
    "Batch",
    "DataReport",
    "Encoded",
    "Message",
    "MicroBatchPlan",
    "MixturePlan",
    "PreparedData",
    "TemplateMismatch",
    "TokenizedExample",
    "collate_classification",
    "collate_lm",
    "collate_pairs",
    "collate_unpaired",
    "data_records",
    "end_of_turn",
    "examples_per_epoch",
    "paraphrase_file",
    "has_chat_template",
    "load_file",
    "prepare",
    "recipe_for",
    "render",
    "require_chat_template",
    "tokenize_chat",
]
