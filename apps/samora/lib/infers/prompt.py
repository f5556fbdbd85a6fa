"""`samora_prompt` infer task: refine one label from clicks/boxes, with cached slice embeddings."""

from __future__ import annotations

import tempfile
import time

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.errors import infer_errors
from samora.data import save_label
from samora.serving.interactive import Prompt, parse_prompt, refine
from samora.serving.runtime import ModelRuntime


def prompt_slice(prompt: Prompt) -> int | None:
    """The axial slice a prompt is about: its slice, its ROI's middle, or its first click (None: unknown)."""
    if prompt.slice is not None:
        return prompt.slice
    if prompt.roi is not None:
        return (prompt.roi[4] + prompt.roi[5]) // 2
    clicks = prompt.foreground + prompt.background
    return clicks[0][2] if clicks else None


class SamoraPrompt(InferTask):
    """deepgrow-type task (3D Slicer shows SmartEdit points and ROI); 2D prompts propagated through z."""

    def __init__(self, runtime: ModelRuntime) -> None:
        super().__init__(
            type=InferType.DEEPGROW,
            labels=dict(runtime.settings.labels),
            dimension=3,
            description="SAMora interactive refinement from points and boxes (SAM prompt encoder, cached embeddings)",
        )
        self.runtime = runtime

    def is_valid(self) -> bool:
        return True

    def info(self) -> dict:
        info = super().info()
        model = self.runtime.store.summary()
        # before any training the prompt path is the backbone's own prompt decoder (pretrained with real weights)
        untrained = "pretrained prompt path" if self.runtime.settings.pretrained else "random-initialised prompt path"
        info["status"] = f"model version {model['version']}" if model["trained"] else untrained
        info["model"] = model
        info["encoder_path"] = self.runtime.encoder_info()
        return info

    def __call__(self, request) -> tuple[str, dict]:
        with infer_errors("samora_prompt", request.get("image")):
            return self._run(request)

    def _run(self, request) -> tuple[str, dict]:
        start = time.perf_counter()
        prompt = parse_prompt(request, list(self.runtime.settings.labels))
        before = self.runtime.encoder_calls
        with self.runtime.prefetcher.foreground():
            # the rest of the study is encoded in the background, nearest this prompt first, once we have answered
            self.runtime.prefetch(request["image"], prompt_slice(prompt))
            settings = self.runtime.settings
            mask, info = refine(
                self.runtime,
                request["image"],
                prompt,
                min_stability=settings.propagation_stability,
                click_confidence=settings.click_spread_confidence,
            )
        volume, _ = self.runtime.volume(request["image"])
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        save_label(mask, volume.affine, out)
        info.update(
            {
                "label_names": {prompt.label or "foreground": 1},
                "encoded_slices": self.runtime.encoder_calls - before,
                "latencies": {"total": round(time.perf_counter() - start, 4)},
            }
        )
        return out, info
