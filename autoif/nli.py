"""An NLI sequence-pair classifier (premise, hypothesis) -> label, e.g. mDeBERTa-v3-base xnli from a local
path. Built once per process by the step runtime (``autoif.runtime.resources``)."""
from __future__ import annotations


class NLIClassifier:
    """A sequence-pair classifier (premise, hypothesis) -> label, loaded once per process and path."""

    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.id2label = {int(k): str(v).lower() for k, v in self.model.config.id2label.items()}

    def labels(self, pairs: list[tuple[str, str]], batch_size: int) -> list[str]:
        out: list[str] = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            enc = self.tokenizer([p for p, _ in chunk], [h for _, h in chunk], truncation=True, padding=True, return_tensors="pt")
            with self.torch.no_grad():
                logits = self.model(**enc).logits
            out.extend(self.id2label[int(i)] for i in logits.argmax(-1).tolist())
        return out

