"""GIFT-SW recovery fine-tuning (``quikft recover``)."""
