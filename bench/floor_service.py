"""The framework's floor for ``bench/serve_load.py``: a BentoML service with mmops' ``/predict`` shape
(multipart ``image`` file + ``question`` text, the image decoded) that answers a constant, no model.

Whatever throughput it reaches on a machine is what BentoML's HTTP stack, multipart parsing and a PNG
decode cost there; mmops' service as a fraction of it is the part of serving mmops controls.

    bentoml serve floor_service:Floor --working-dir bench --port 3001
"""

from __future__ import annotations

from pathlib import Path

import bentoml
from PIL import Image


@bentoml.service(name="floor", resources={"cpu": "1"}, traffic={"timeout": 30, "max_concurrency": 128})
class Floor:
    @bentoml.api
    async def predict(self, image: Path, question: str, top_k: int = 3) -> dict:
        with Image.open(image) as decoded:
            pixels = decoded.convert("RGB")
        return {
            "answer": "yes",
            "score": 1.0,
            "top_k": [{"label": "yes", "score": 1.0}][:top_k],
            "size": list(pixels.size),
            "question_chars": len(question),
        }
