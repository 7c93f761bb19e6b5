"""Training: one loop for every recipe (sft, cpt, dpo, classify) over 4-bit or 16-bit bases."""
